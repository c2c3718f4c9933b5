// parallel/model/moe_block.h — a Mixture-of-Experts FFN layer (Mixtral, Qwen2-MoE):
// router logits -> softmax/top-k -> permute -> grouped SwiGLU experts -> unpermute,
// plus Qwen2-MoE's shared expert scaled by sigmoid(x . w_sg).
//
//   moe_activations a;
//   moe_forward(out, a, x, L, cfg, N);
//   moe_backward(dx, G, dout, a, x, L, cfg, N);
//
// Invariants:
//   1. The routing (top-k ids and weights) is computed once in forward and reused by
//      backward; normalize = norm_topk_prob (always true for Mixtral).
//   2. backward writes (=) dx and accumulates (+=) into every gradient of the layer's MoE
//      parameters: router, each expert, shared expert and shared_expert_gate.
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/model/mlp_block.h"
#include "parallel/model/model_weights.h"

namespace troupe::parallel {

// What backward needs from forward. R = N * top_k permuted rows.
struct moe_activations {
  runtime::tensor probs;        // (N, E) router softmax
  runtime::tensor topk_idx;     // (N, K) i32
  runtime::tensor topk_w;       // (N, K)
  std::vector<int32_t> offsets, row_slot, slot_row;  // (E+1), (R), (R): the permute plan
  runtime::tensor xp;           // (R, C) permuted inputs
  runtime::tensor h_gate, h_up; // (R, Im) expert pre-activations
  runtime::tensor yp;           // (R, C) expert outputs (before the routing weights)
  // shared expert (Qwen2-MoE), undefined otherwise
  mlp_activations shared;       // (N, Is)
  runtime::tensor shared_out;   // (N, C) shared expert output before the gate
  runtime::tensor shared_gate;  // (N) sigmoid(x . w_sg)
};

bool moe_normalize_topk(const model_config& c);

// x: (N, C)  ->  out: (N, C) =
void moe_forward(float* out, moe_activations& a, const float* x, const layer_params& L, const model_config& c,
                 int64_t N);
// dout: (N, C)  ->  dx: (N, C) =, G's MoE tensors +=
void moe_backward(float* dx, layer_params& G, const float* dout, const moe_activations& a, const float* x,
                  const layer_params& L, const model_config& c, int64_t N);

}  // namespace troupe::parallel
