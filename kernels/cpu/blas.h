// kernels/cpu/blas.h — sgemm for the CPU kernels: OpenMP splits the output, each thread
// runs a single-threaded OpenBLAS sgemm on its block (internal to kernels/cpu).
//
//   cpu::sgemm(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);  // out = inp @ W^T
//   // rows [r, N) of that same product, bitwise; rows [sgemm_rows_start(N, OC, C, r), r) are rewritten too
//   cpu::sgemm_rows(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC, r);
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
//   4. sgemm_rows(..., row_begin) runs the blocks of sgemm's split of the FULL (M, N, K) problem
//      that hold rows >= row_begin, each with the very OpenBLAS call sgemm makes for it, so every
//      row it writes is bitwise sgemm's. It writes rows [sgemm_rows_start(M, N, K, row_begin), M):
//      the start is row_begin rounded down to its block; 0 when sgemm does not split by rows (a
//      small problem, or a split by columns), then it runs the whole sgemm; M when row_begin == M.
//      C's rows from the start on must hold what sgemm's C held there (matters when beta != 0).
#pragma once
#include <cstdint>

namespace troupe::kernels::cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// sgemm's rows [row_begin, M) (invariant 4); 0 <= row_begin <= M.
void sgemm_rows(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t row_begin);
// The first row of C that sgemm_rows(M, N, K, ..., row_begin) writes: <= row_begin (invariant 4).
int64_t sgemm_rows_start(int64_t M, int64_t N, int64_t K, int64_t row_begin);

}  // namespace troupe::kernels::cpu
