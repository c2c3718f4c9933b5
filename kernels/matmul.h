// kernels/matmul.h — the linear layer, nn.Linear layout (weight is (OC, C)).
//
//   cpu::matmul_forward(out, inp, w, bias, N, C, OC);               // out = inp @ w^T + bias
//   cpu::matmul_backward(dinp, dw, dbias, dout, inp, w, N, C, OC);  // dinp =, dw +=, dbias +=
//   int64_t r = cpu::matmul_forward_rows(out, inp, w, bias, N, C, OC, n0);  // rows [r, N), r <= n0
//
// Invariants:
//   1. fp32 everywhere; the cpu path is OpenBLAS sgemm, the cuda path cuBLAS sgemm.
//   2. bias, dinp, dw, dbias are nullable.
//   3. matmul_forward_rows writes rows [r, N) of out, r = cpu::sgemm_rows_start(N, OC, C, row_begin)
//      <= row_begin (kernels/cpu/blas.h, invariant 4), each bitwise equal to matmul_forward's row;
//      it reads only rows [r, N) of inp and leaves out's rows < r untouched.
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
// inp: (N, C)  weight: (OC, C)  bias: (OC) nullable  ->  out: (N, OC)
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC);
// The same product, only rows [r, N) of the full (N, OC) out (invariant 3); returns r. 0 <= row_begin <= N.
int64_t matmul_forward_rows(float* out, const float* inp, const float* weight, const float* bias, int64_t N,
                            int64_t C, int64_t OC, int64_t row_begin);
// dout: (N, OC)  ->  dinp: (N, C) =   dweight: (OC, C) +=   dbias: (OC) +=   (all nullable)
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC);
// The machine's fp32 matmul peak as this process sees it (its thread count): the best of
// `reps` (n x n) @ (n x n) sgemms, in GFLOP/s. MFU is reported against this.
double sgemm_peak_gflops(int64_t n = 1024, int reps = 3);
}  // namespace cpu
namespace cuda {
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
