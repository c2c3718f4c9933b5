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
//   3. Batch invariant except for the shared expert: a token's router logits (and the router's
//      input gradient) come from fixed-shape 16-row sgemm calls and its expert rows from the
//      expert FFN's fixed tiles (kernels/moe.h invariant 5), so with the same expert row order a
//      token's output does not depend on which other tokens share the batch — expert
//      parallelism is bitwise (parallel/ep/ep_layer.h). The shared expert's dense MLP is not.
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
// The pieces moe_forward/moe_backward are made of, shared with the expert-parallel layer
// (parallel/ep/ep_layer.h), which runs the expert FFN across ranks in between.
// Router logits, softmax/top-k and the permute plan: a.probs, topk_idx, topk_w, offsets, row_slot, slot_row.
void moe_route(moe_activations& a, const float* x, const layer_params& L, const model_config& c, int64_t N);
// out += sigmoid(x . w_sg) * shared_mlp(x); nothing without a shared expert.
void moe_shared_forward(float* out, moe_activations& a, const float* x, const layer_params& L, const model_config& c,
                        int64_t N);
// After dx = permute_backward(dxp): dx += the router's and the shared expert's input gradients,
// G's router / shared tensors +=. dtopk_w: (N, K) from unpermute_backward.
void moe_router_shared_backward(float* dx, layer_params& G, const float* dout, const float* dtopk_w,
                                const moe_activations& a, const float* x, const layer_params& L,
                                const model_config& c, int64_t N);

// Runs the MoE layers somewhere else than this rank alone: the expert-parallel layer
// (parallel/ep/ep_runner.h) implements it; the decoder calls it instead of moe_forward/moe_backward
// when one is set (decoder::set_expert_parallel). It keeps each layer's activations itself.
class moe_runner {
 public:
  virtual ~moe_runner() = default;
  // x: (N, C)  ->  out: (N, C) =
  virtual void forward(int64_t layer, float* out, const float* x, const layer_params& L, const model_config& c,
                       int64_t N) = 0;
  // dout: (N, C)  ->  dx: (N, C) =, G's MoE tensors +=
  virtual void backward(int64_t layer, float* dx, layer_params& G, const float* dout, const float* x,
                        const layer_params& L, const model_config& c, int64_t N) = 0;
};

// dout: (N, C)  ->  dx: (N, C) =, G's MoE tensors +=
void moe_backward(float* dx, layer_params& G, const float* dout, const moe_activations& a, const float* x,
                  const layer_params& L, const model_config& c, int64_t N);

}  // namespace troupe::parallel
