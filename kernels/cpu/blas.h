// kernels/cpu/blas.h — sgemm for the CPU kernels: OpenMP splits the output, each thread
// runs a single-threaded OpenBLAS sgemm on its block (internal to kernels/cpu).
//
//   cpu::sgemm(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);  // out = inp @ W^T
//
// Invariants:
//   1. Row-major, cblas semantics: C (M x N) = alpha * op(A) op(B) + beta * C, op = transpose
//      when trans*; lda/ldb/ldc are the row strides of A, B, C as stored.
//   2. One thread pool for all CPU work: troupe sets OpenBLAS to one thread (runtime/threads)
//      and parallelises here with OpenMP. OpenBLAS' own pool spin-waiting next to OpenMP's
//      doubled the training step on 2 cores (measured: bench/train_bench, docs/BENCHMARKS.md).
//   3. The split is over rows of C (columns when C has too few rows) into at most 8 blocks
//      chosen from the shape alone; the reduction over K is never split. So the result does
//      not depend on the thread count (bitwise), though it may differ in the last bits from
//      one unsplit sgemm (OpenBLAS uses other kernels for small problems).
#pragma once
#include <cstdint>

namespace troupe::kernels::cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace troupe::kernels::cpu
