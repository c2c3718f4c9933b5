// parallel/model/decoder_layer.h — one decoder layer (pre-norm residual block) and the
// activations its backward needs.
//
//   layer_activations a;
//   layer_forward(x, a, L, cfg, g, cos, sin, /*cache=*/nullptr, l);   // x: input -> output
//   layer_backward(dx, G, a, L, cfg, g, cos, sin);                   // dx: d(out) -> d(in)
//
// Invariants:
//   1. x_mid = x_in + attn(rmsnorm1(x_in)); x_out = x_mid + ffn(rmsnorm2(x_mid)), ffn the
//      dense SwiGLU MLP or the MoE block (layer_params::is_moe).
//   2. layer_activations is THE saved state of a layer between forward and backward, and
//      the hook for MEMO: every tensor in it is either kept, swapped to host (x_in and att
//      always whole; the rest α of the tokens) or recomputed token-wise from x_in before
//      layer_backward runs. layer_backward reads nothing else from forward.
//   3. layer_backward writes (=) dx and accumulates (+=) into every parameter gradient of G.
#pragma once
#include <cstdint>

#include "parallel/model/attention_block.h"
#include "parallel/model/mlp_block.h"
#include "parallel/model/moe_block.h"

namespace troupe::parallel {

// Per layer, N = B*T tokens. Shapes as in attention_block.h / mlp_block.h / moe_block.h.
struct layer_activations {
  runtime::tensor x_in;    // (N, C)  layer input (residual stream)            [MEMO: swap whole]
  runtime::tensor xn1;     // (N, C)  input_layernorm output
  runtime::tensor rstd1;   // (N)
  runtime::tensor q, k, v; // (N, QD), (N, KVD), (N, KVD)  after RoPE
  runtime::tensor att;     // (N, QD) attention output, input of o_proj        [MEMO: swap whole]
  runtime::tensor lse;     // (B, NH, T) attention log-sum-exp
  runtime::tensor x_mid;   // (N, C)  residual after attention
  runtime::tensor xn2;     // (N, C)  post_attention_layernorm output
  runtime::tensor rstd2;   // (N)
  mlp_activations mlp;     // dense layers: (N, I) gate, up, act
  moe_activations moe;     // MoE layers: routing, permuted rows, expert and shared activations
  size_t bytes() const;    // bytes held (for memory reports)
};

// x: (N, C) layer input  ->  x: (N, C) layer output (in place); a filled
// moe: runs an MoE layer's FFN elsewhere (expert parallelism); nullptr = moe_forward here.
void layer_forward(float* x, layer_activations& a, const layer_params& L, const model_config& c,
                   const attention_geom& g, const float* cos, const float* sin, kv_cache* cache, int64_t layer,
                   moe_runner* moe = nullptr);
// dx: (N, C) d(layer output)  ->  dx: (N, C) d(layer input) (in place); G +=
void layer_backward(float* dx, layer_params& G, const layer_activations& a, const layer_params& L,
                    const model_config& c, const attention_geom& g, const float* cos, const float* sin,
                    int64_t layer = 0, moe_runner* moe = nullptr);

}  // namespace troupe::parallel
