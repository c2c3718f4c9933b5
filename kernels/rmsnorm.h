// kernels/rmsnorm.h — RMSNorm (Llama): out = x / sqrt(mean(x^2) + eps) * w.
//
//   cpu::rmsnorm_forward(out, rstd, x, w, N, C, eps);
//   cpu::rmsnorm_backward(dx, dw, dout, x, w, rstd, N, C);
//
// Invariants:
//   1. rstd (N) is saved by forward for backward; nullable in forward.
//   2. out may alias x (in place).
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
// x: (N, C)  w: (C)  ->  out: (N, C), rstd: (N)
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps);
// dout: (N, C)  ->  dx: (N, C) =   dw: (C) +=
void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C);
}  // namespace cpu
namespace cuda {
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps,
                     void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
