// tests/unit/sgemm_rows_test.cpp — the row-suffix GEMM (kernels/cpu/blas.h invariant 4,
// kernels/matmul.h invariant 3): every row sgemm_rows / matmul_forward_rows writes is bitwise
// (memcmp) the full sgemm / matmul_forward's row, rows below the reported start stay untouched,
// the start is <= row_begin, for M from 1 to 3000 (unsplit, row- and column-split shapes), with
// and without bias, beta 0 and 1, 1 and 2 threads. Also the row-wise kernels MEMO recomputes on a
// row suffix (rmsnorm, rope per sequence, swiglu) against the full call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "dense_test_util.h"
#include "kernels/cpu/blas.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/error.h"
#include "runtime/threads.h"

namespace {

namespace kc = troupe::kernels::cpu;
using dense_test::randn;

struct shape {
  int64_t M, N, K;
};

// Unsplit (small), split by columns (M < 32), split by rows with blocks of 16 .. 384 rows.
const shape kShapes[] = {{1, 5, 3},     {7, 300, 200},  {20, 64, 8},    {31, 2000, 16}, {32, 64, 128},
                         {33, 96, 100}, {128, 64, 64},  {129, 32, 64},  {500, 17, 40},  {1000, 70, 33},
                         {2047, 24, 16}, {3000, 64, 48}};

// row_begin values: 0, middle, just past a block start, M-1, M.
std::vector<int64_t> row_begins(int64_t M) {
  std::vector<int64_t> r = {0, M / 2, std::min<int64_t>(M, 17), std::min<int64_t>(M, 33), M - 1, M};
  std::sort(r.begin(), r.end());
  r.erase(std::unique(r.begin(), r.end()), r.end());
  return r;
}

bool same_bits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

TEST(sgemm_rows, rows_bitwise_equal_to_sgemm) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int checked = 0;
  for (const shape& s : kShapes) {
    const auto [M, N, K] = s;
    // op(A) is (M, K), op(B) is (K, N); the stored layouts below cover the three products the
    // kernels use: A B^T (forward), A B (dinp), A^T B (dweight).
    const auto A = randn(M * K, 1), Bm = randn(K * N, 2), C0 = randn(M * N, 3);
    for (int variant = 0; variant < 3; ++variant) {
      const bool ta = variant == 2, tb = variant == 0;
      const int64_t lda = ta ? M : K, ldb = tb ? K : N;
      for (float beta : {0.0f, 1.0f}) {
        std::vector<float> ref = C0;
        kc::sgemm(ta, tb, M, N, K, 1.0f, A.data(), lda, Bm.data(), ldb, beta, ref.data(), N);
        for (int64_t rb : row_begins(M)) {
          for (int threads : {1, 2}) {
            troupe::runtime::set_num_threads(threads);
            const std::string what = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                                     std::to_string(K) + " variant=" + std::to_string(variant) +
                                     " beta=" + std::to_string(beta) + " row_begin=" + std::to_string(rb) +
                                     " threads=" + std::to_string(threads);
            const int64_t r = kc::sgemm_rows_start(M, N, K, rb);
            ASSERT_LE(r, rb) << what;
            ASSERT_GE(r, 0) << what;
            if (rb == M) {
              EXPECT_EQ(r, M) << what;
            }
            // Rows [r, M) hold C0 (what sgemm's C held there); rows below r a NaN sentinel.
            std::vector<float> got(static_cast<size_t>(M * N), nan);
            std::copy(C0.begin() + r * N, C0.end(), got.begin() + r * N);
            kc::sgemm_rows(ta, tb, M, N, K, 1.0f, A.data(), lda, Bm.data(), ldb, beta, got.data(), N, rb);
            EXPECT_TRUE(same_bits(got.data() + r * N, ref.data() + r * N, (M - r) * N)) << what;
            for (int64_t i = 0; i < r * N; ++i)
              ASSERT_TRUE(std::isnan(got[static_cast<size_t>(i)])) << what << ": wrote row " << i / N << " < " << r;
            ++checked;
          }
        }
      }
    }
  }
  troupe::runtime::set_num_threads(0);
  EXPECT_GT(checked, 300);
}

TEST(sgemm_rows, start_follows_the_split) {
  // 128 x 64 x 64: 8 row blocks of 16.
  EXPECT_EQ(kc::sgemm_rows_start(128, 64, 64, 0), 0);
  EXPECT_EQ(kc::sgemm_rows_start(128, 64, 64, 38), 32);
  EXPECT_EQ(kc::sgemm_rows_start(128, 64, 64, 64), 64);
  EXPECT_EQ(kc::sgemm_rows_start(128, 64, 64, 127), 112);
  EXPECT_EQ(kc::sgemm_rows_start(128, 64, 64, 128), 128);
  // 3000 rows: ceil(3000 / 8) = 375, rounded up to 384-row blocks.
  EXPECT_EQ(kc::sgemm_rows_start(3000, 64, 48, 2999), 2688);
  EXPECT_EQ(kc::sgemm_rows_start(3000, 64, 48, 1000), 768);
  // Small problem (one sgemm) and a column split: everything from row 0.
  EXPECT_EQ(kc::sgemm_rows_start(40, 8, 8, 39), 0);
  EXPECT_EQ(kc::sgemm_rows_start(31, 2000, 16, 30), 0);
  EXPECT_THROW(kc::sgemm_rows_start(10, 64, 64, 11), troupe::runtime::error);
  EXPECT_THROW(kc::sgemm_rows_start(10, 64, 64, -1), troupe::runtime::error);
}

TEST(matmul_forward_rows, rows_bitwise_equal_to_matmul_forward) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // (N, C, OC) as matmul_forward takes them: sgemm's (M, N, K) is (N, OC, C).
  const shape kMm[] = {{1, 8, 4},       {7, 200, 300},   {30, 16, 2000}, {128, 64, 64},  {128, 64, 32},
                       {128, 64, 96},   {333, 40, 50},   {1000, 33, 70}, {3000, 48, 64}, {5, 0, 6}};
  for (const shape& s : kMm) {
    const auto [N, C, OC] = s;
    const auto x = randn(N * C, 4), w = randn(OC * C, 5), b = randn(OC, 6);
    for (bool bias : {false, true}) {
      std::vector<float> ref(static_cast<size_t>(N * OC));
      kc::matmul_forward(ref.data(), x.data(), w.data(), bias ? b.data() : nullptr, N, C, OC);
      for (int64_t rb : row_begins(N)) {
        const std::string what = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " OC=" +
                                 std::to_string(OC) + " bias=" + std::to_string(bias) +
                                 " row_begin=" + std::to_string(rb);
        std::vector<float> got(ref.size(), nan);
        const int64_t r = kc::matmul_forward_rows(got.data(), x.data(), w.data(), bias ? b.data() : nullptr, N, C,
                                                  OC, rb);
        EXPECT_LE(r, rb) << what;
        if (C > 0) {
          EXPECT_EQ(r, kc::sgemm_rows_start(N, OC, C, rb)) << what;
        }
        EXPECT_TRUE(same_bits(got.data() + r * OC, ref.data() + r * OC, (N - r) * OC)) << what;
        for (int64_t i = 0; i < r * OC; ++i)
          ASSERT_TRUE(std::isnan(got[static_cast<size_t>(i)])) << what << ": wrote row " << i / OC;
      }
    }
  }
}

// MEMO's recompute calls the row-wise kernels on a row suffix; each row must not depend on N.
TEST(row_wise_kernels, suffix_call_bitwise_equal_to_full_call) {
  const int64_t B = 3, T = 37, NH = 3, HD = 16, rot = 12, N = B * T, C = NH * HD, I = 45;
  const auto x = randn(N * C, 7), w = randn(C, 8), g = randn(N * I, 9), u = randn(N * I, 10);
  std::vector<float> cos(static_cast<size_t>(T * rot / 2)), sin(cos.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < rot / 2; ++i) {
      const double a = static_cast<double>(t) * std::pow(10000.0, -2.0 * static_cast<double>(i) / rot);
      cos[static_cast<size_t>(t * rot / 2 + i)] = static_cast<float>(std::cos(a));
      sin[static_cast<size_t>(t * rot / 2 + i)] = static_cast<float>(std::sin(a));
    }
  std::vector<float> yn(x.size()), rs(N), act(g.size()), rq = x;
  kc::rmsnorm_forward(yn.data(), rs.data(), x.data(), w.data(), N, C, 1e-5f);
  kc::swiglu_forward(act.data(), g.data(), u.data(), N, I);
  kc::rope_forward(rq.data(), rq.data(), cos.data(), sin.data(), B, T, NH, HD, rot);
  for (int64_t r0 : {int64_t{0}, int64_t{1}, int64_t{T - 1}, int64_t{T}, int64_t{50}, int64_t{N - 1}}) {
    const int64_t n = N - r0;
    std::vector<float> yn2(x.size()), rs2(N), act2(g.size()), rq2 = x;
    kc::rmsnorm_forward(yn2.data() + r0 * C, rs2.data() + r0, x.data() + r0 * C, w.data(), n, C, 1e-5f);
    kc::swiglu_forward(act2.data() + r0 * I, g.data() + r0 * I, u.data() + r0 * I, n, I);
    for (int64_t b = r0 / T; b < B; ++b) {  // as recompute_dense's rope_rows
      const int64_t p = std::max(r0, b * T) - b * T;
      float* q = rq2.data() + (b * T + p) * C;
      kc::rope_forward(q, q, cos.data() + p * rot / 2, sin.data() + p * rot / 2, 1, T - p, NH, HD, rot);
    }
    EXPECT_TRUE(same_bits(yn2.data() + r0 * C, yn.data() + r0 * C, n * C)) << "rmsnorm r0=" << r0;
    EXPECT_TRUE(same_bits(rs2.data() + r0, rs.data() + r0, n)) << "rstd r0=" << r0;
    EXPECT_TRUE(same_bits(act2.data() + r0 * I, act.data() + r0 * I, n * I)) << "swiglu r0=" << r0;
    EXPECT_TRUE(same_bits(rq2.data() + r0 * C, rq.data() + r0 * C, n * C)) << "rope r0=" << r0;
    EXPECT_TRUE(same_bits(rq2.data(), x.data(), r0 * C)) << "rope touched rows < r0=" << r0;
  }
}

}  // namespace
