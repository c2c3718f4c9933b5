// kernels/cpu/rmsnorm.cpp — RMSNorm (HF LlamaRMSNorm in fp32): out = w * (x * rsqrt(mean(x^2) + eps)).
#include "kernels/rmsnorm.h"

#include <cmath>
#include <vector>

namespace troupe::kernels::cpu {

// x: (N, C)  w: (C)  ->  out: (N, C), rstd: (N) nullable; out may alias x.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps) {
  if (N <= 0 || C <= 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    double ss = 0.0;  // sum of squares in double: accurate, and fixed order
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float ms = static_cast<float>(ss / static_cast<double>(C));
    const float r = 1.0f / std::sqrt(ms + eps);
    if (rstd != nullptr) rstd[n] = r;
    float* orow = out + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) orow[c] = w[c] * (xr[c] * r);
  }
}

// dout: (N, C)  ->  dx: (N, C) =   dw: (C) +=
// With y_i = w_i x_i r and r = (mean(x^2) + eps)^(-1/2):
//   dx_i = r w_i dout_i - x_i r^3 / C * sum_j dout_j w_j x_j,   dw_i += sum_n dout_ni x_ni r_n.
void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return;
  if (dx != nullptr) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * C;
      const float* gr = dout + n * C;
      const float r = rstd[n];
      double dot = 0.0;
      for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(gr[c]) * w[c] * xr[c];
      const float k = static_cast<float>(dot * static_cast<double>(r) * r * r / static_cast<double>(C));
      float* dxr = dx + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dxr[c] = r * w[c] * gr[c] - xr[c] * k;
    }
  }
  if (dw != nullptr) {
    // Threads own column blocks and add rows in order: deterministic for any thread count.
    constexpr int64_t col_block = 64;
    const int64_t n_blocks = (C + col_block - 1) / col_block;
#pragma omp parallel for schedule(static)
    for (int64_t cb = 0; cb < n_blocks; ++cb) {
      const int64_t c0 = cb * col_block;
      const int64_t c1 = c0 + col_block < C ? c0 + col_block : C;
      float acc[col_block] = {};
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = x + n * C;
        const float* gr = dout + n * C;
        const float r = rstd[n];
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += gr[c] * (xr[c] * r);
      }
      for (int64_t c = c0; c < c1; ++c) dw[c] += acc[c - c0];
    }
  }
}

}  // namespace troupe::kernels::cpu
