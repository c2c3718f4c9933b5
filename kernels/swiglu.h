// kernels/swiglu.h — the SwiGLU gate of Llama/Mixtral MLPs: out = silu(gate) * up.
//
//   cpu::swiglu_forward(out, gate, up, N, I);
//   cpu::swiglu_backward(dgate, dup, dout, gate, up, N, I);
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
// gate, up: (N, I)  ->  out: (N, I)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t I);
// dout: (N, I)  ->  dgate, dup: (N, I) =
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t N,
                     int64_t I);
}  // namespace cpu
namespace cuda {
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t I, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
