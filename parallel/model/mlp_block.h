// parallel/model/mlp_block.h — the SwiGLU MLP of Llama-family layers (also Qwen2-MoE's
// shared expert): out = down( silu(gate(x)) * up(x) ).
//
//   mlp_activations a = mlp_activations::allocate(N, I);
//   mlp_forward(out, a, x, L.gate_w, L.up_w, L.down_w, N, C, I);
//   mlp_backward(dx, G.gate_w, G.up_w, G.down_w, dout, a, x, L.gate_w, L.up_w, L.down_w, N, C, I);
//
// Invariants:
//   1. Weights are nn.Linear layout: gate/up (I, C), down (C, I); no biases.
//   2. backward writes (=) dx and accumulates (+=) the weight gradients (nullable).
#pragma once
#include <cstdint>

#include "parallel/model/model_weights.h"

namespace troupe::parallel {

// What backward needs from forward (the MEMO "skeletal" tensors of an MLP).
struct mlp_activations {
  runtime::tensor h_gate;  // (N, I) gate pre-activation
  runtime::tensor h_up;    // (N, I) up projection
  runtime::tensor act;     // (N, I) silu(h_gate) * h_up, the input of down
  static mlp_activations allocate(int64_t N, int64_t I);
};

// x: (N, C)  ->  out: (N, C) =, a filled
void mlp_forward(float* out, mlp_activations& a, const float* x, const runtime::tensor& w_gate,
                 const runtime::tensor& w_up, const runtime::tensor& w_down, int64_t N, int64_t C, int64_t I);
// dout: (N, C)  ->  dx: (N, C) =, dw_*: +=  (dw_* may be undefined tensors: skipped)
void mlp_backward(float* dx, const runtime::tensor& dw_gate, const runtime::tensor& dw_up,
                  const runtime::tensor& dw_down, const float* dout, const mlp_activations& a, const float* x,
                  const runtime::tensor& w_gate, const runtime::tensor& w_up, const runtime::tensor& w_down,
                  int64_t N, int64_t C, int64_t I);

}  // namespace troupe::parallel
