// kernels/cpu/blas.cpp — see blas.h.
#include "kernels/cpu/blas.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

#include "runtime/threads.h"

namespace troupe::kernels::cpu {

namespace {

void one(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(M),
              static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb),
              beta, C, static_cast<int>(ldc));
}

}  // namespace

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  static const int configured = runtime::num_threads();  // applies the thread setting (OpenBLAS: 1) once
  (void)configured;
  // The blocks depend on the shape only, never on the thread count, so 1 and 8 threads
  // compute every element with the same sgemm call shape (OpenBLAS picks different kernels
  // for small and large problems, which round differently).
  constexpr int64_t min_block = 16, max_blocks = 8;
  if (M * N * std::max<int64_t>(K, 1) < int64_t{1} << 18 || (M < 2 * min_block && N < 2 * min_block)) {
    one(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const bool by_rows = M >= 2 * min_block;
  const int64_t extent = by_rows ? M : N;
  const int64_t want = std::min(max_blocks, extent / min_block);
  int64_t block = (extent + want - 1) / want;
  block = (block + min_block - 1) / min_block * min_block;
  const int64_t blocks = (extent + block - 1) / block;
  const int64_t threads = omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads());
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(std::min(threads, blocks))) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * block, n = std::min(block, extent - i0);
    if (by_rows)  // rows i0.. of op(A) and of C
      one(trans_a, trans_b, n, N, K, alpha, trans_a ? A + i0 : A + i0 * lda, lda, B, ldb, beta, C + i0 * ldc, ldc);
    else  // columns i0.. of op(B) and of C
      one(trans_a, trans_b, M, n, K, alpha, A, lda, trans_b ? B + i0 * ldb : B + i0, ldb, beta, C + i0, ldc);
  }
}

}  // namespace troupe::kernels::cpu
