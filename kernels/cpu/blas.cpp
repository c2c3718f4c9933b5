// kernels/cpu/blas.cpp — see blas.h.
#include "kernels/cpu/blas.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

#include "runtime/error.h"
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

// How sgemm splits C for the shape (M, N, K): `blocks` blocks of `block` rows (by_rows) or columns,
// the last one shorter; blocks == 0 means one unsplit call. The one place that decides (invariants 3, 4).
struct split {
  bool by_rows = false;
  int64_t block = 0, blocks = 0;
};

// The blocks depend on the shape only, never on the thread count, so 1 and 8 threads compute every
// element with the same sgemm call shape (OpenBLAS picks different kernels for small and large
// problems, which round differently).
split partition(int64_t M, int64_t N, int64_t K) {
  constexpr int64_t min_block = 16, max_blocks = 8;
  if (M * N * std::max<int64_t>(K, 1) < int64_t{1} << 18 || (M < 2 * min_block && N < 2 * min_block)) return {};
  split s;
  s.by_rows = M >= 2 * min_block;
  const int64_t extent = s.by_rows ? M : N;
  const int64_t want = std::min(max_blocks, extent / min_block);
  s.block = (extent + want - 1) / want;
  s.block = (s.block + min_block - 1) / min_block * min_block;
  s.blocks = (extent + s.block - 1) / s.block;
  return s;
}

// Blocks [first, s.blocks) of the split, in parallel (each one single-threaded OpenBLAS call).
void run_blocks(const split& s, int64_t first, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  static const int configured = runtime::num_threads();  // applies the thread setting (OpenBLAS: 1) once
  (void)configured;
  if (s.blocks == 0) {
    one(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const int64_t extent = s.by_rows ? M : N, block = s.block, count = s.blocks - first;
  if (count <= 0) return;
  const int64_t threads = omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads());
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(std::min(threads, count))) if (threads > 1)
  for (int64_t b = first; b < s.blocks; ++b) {
    const int64_t i0 = b * block, n = std::min(block, extent - i0);
    if (s.by_rows)  // rows i0.. of op(A) and of C
      one(ta, tb, n, N, K, alpha, ta ? A + i0 : A + i0 * lda, lda, B, ldb, beta, C + i0 * ldc, ldc);
    else  // columns i0.. of op(B) and of C
      one(ta, tb, M, n, K, alpha, A, lda, tb ? B + i0 * ldb : B + i0, ldb, beta, C + i0, ldc);
  }
}

}  // namespace

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  run_blocks(partition(M, N, K), 0, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

int64_t sgemm_rows_start(int64_t M, int64_t N, int64_t K, int64_t row_begin) {
  TROUPE_CHECK(row_begin >= 0 && row_begin <= std::max<int64_t>(M, 0), runtime::errc::invalid_argument,
               "sgemm_rows: row_begin {} must be in [0, M = {}]", row_begin, M);
  if (M <= 0 || N <= 0 || row_begin == M) return std::max<int64_t>(M, 0);  // nothing to write
  const split s = partition(M, N, K);
  if (s.blocks == 0 || !s.by_rows) return 0;
  return row_begin / s.block * s.block;
}

void sgemm_rows(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t row_begin) {
  const int64_t start = sgemm_rows_start(M, N, K, row_begin);  // checks row_begin
  if (M <= 0 || N <= 0 || start == M) return;
  const split s = partition(M, N, K);
  const int64_t first = s.blocks > 0 && s.by_rows ? start / s.block : 0;
  run_blocks(s, first, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace troupe::kernels::cpu
