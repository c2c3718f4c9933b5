// kernels/cpu/matmul.cpp — the linear layer on OpenBLAS sgemm, nn.Linear layout.
#include "kernels/matmul.h"
#include "kernels/cpu/blas.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <vector>

namespace troupe::kernels::cpu {

// inp: (N, C)  weight: (OC, C)  bias: (OC) nullable  ->  out: (N, OC)
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC) {
  if (N <= 0 || OC <= 0) return;
  float beta = 0.0f;
  if (bias != nullptr) {  // out = bias, then out += inp @ W^T
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) out[n * OC + o] = bias[o];
    beta = 1.0f;
  }
  if (C <= 0) {
    if (bias == nullptr)
      for (int64_t i = 0; i < N * OC; ++i) out[i] = 0.0f;
    return;
  }
  sgemm(false, true, N, OC, C, 1.0f, inp, C, weight, C, beta, out, OC);
}

// Rows [r, N) of matmul_forward's out, the same way: bias rows then beta = 1, and the forward's
// sgemm blocks from the one holding row_begin (kernels/cpu/blas.h, invariant 4).
int64_t matmul_forward_rows(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                            int64_t C, int64_t OC, int64_t row_begin) {
  const int64_t r = sgemm_rows_start(N, OC, std::max<int64_t>(C, 0), row_begin);  // checks row_begin
  if (N <= 0 || OC <= 0 || r == N) return std::max<int64_t>(r, 0);
  float beta = 0.0f;
  if (bias != nullptr) {
#pragma omp parallel for schedule(static)
    for (int64_t n = r; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) out[n * OC + o] = bias[o];
    beta = 1.0f;
  }
  if (C <= 0) {
    if (bias == nullptr)
      for (int64_t i = r * OC; i < N * OC; ++i) out[i] = 0.0f;
    return r;
  }
  sgemm_rows(false, true, N, OC, C, 1.0f, inp, C, weight, C, beta, out, OC, row_begin);
  return r;
}

// dout: (N, OC)  ->  dinp: (N, C) =   dweight: (OC, C) +=   dbias: (OC) +=   (all nullable)
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC) {
  if (N <= 0) return;
  if (dinp != nullptr && C > 0) {
    if (OC > 0) {  // dinp = dout @ W
      sgemm(false, false, N, C, OC, 1.0f, dout, OC, weight, C, 0.0f, dinp, C);
    } else {
      for (int64_t i = 0; i < N * C; ++i) dinp[i] = 0.0f;
    }
  }
  if (dweight != nullptr && OC > 0 && C > 0) {  // dW += dout^T @ inp
    sgemm(true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
  }
  if (dbias != nullptr && OC > 0) {
    // Column sums; each thread owns a block of columns and adds rows in order (deterministic).
    constexpr int64_t col_block = 64;
    const int64_t n_blocks = (OC + col_block - 1) / col_block;
#pragma omp parallel for schedule(static)
    for (int64_t ob = 0; ob < n_blocks; ++ob) {
      const int64_t o0 = ob * col_block;
      const int64_t o1 = o0 + col_block < OC ? o0 + col_block : OC;
      float acc[col_block] = {};
      for (int64_t n = 0; n < N; ++n) {
        const float* row = dout + n * OC;
#pragma omp simd
        for (int64_t o = o0; o < o1; ++o) acc[o - o0] += row[o];
      }
      for (int64_t o = o0; o < o1; ++o) dbias[o] += acc[o - o0];
    }
  }
}

double sgemm_peak_gflops(int64_t n, int reps) {
  std::vector<float> a(static_cast<size_t>(n * n), 0.5f), b(a.size(), 0.25f), c(a.size(), 0.0f);
  double best = 1e30;
  for (int r = 0; r < std::max(1, reps) + 1; ++r) {  // the first run warms up
    const auto t0 = std::chrono::steady_clock::now();
    sgemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::min(best, s);
  }
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / best * 1e-9;
}

}  // namespace troupe::kernels::cpu
