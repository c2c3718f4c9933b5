// tests/unit/kernels_cross_entropy_test.cpp — cross-entropy from logits vs a double
// log-softmax, and the fused chunked classifier vs the unfused path (matmul + loss +
// hand-written gradient), with ignored (-100) targets and chunk sizes 1, 7, N.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "dense_test_util.h"
#include "kernels/cross_entropy.h"
#include "kernels/matmul.h"
#include "runtime/error.h"

namespace kc = troupe::kernels::cpu;
using dense_test::randn;
using dense_test::rel_err;
using troupe::runtime::errc;

namespace {
double ref_loss(const float* x, int64_t V, int32_t t) {
  double mx = x[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, double(x[i]));
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(double(x[i]) - mx);
  return std::log(s) + mx - x[t];
}
}  // namespace

TEST(cross_entropy, forward_matches_log_softmax) {
  const int64_t N = 6, V = 50;
  auto logits = randn(N * V, 1, 4.0f);
  logits[2 * V + 3] = 500.0f;  // would overflow a naive exp
  std::vector<int32_t> tgt = {0, 49, 3, -100, 17, 5};
  std::vector<float> loss(N, 7.0f);
  kc::cross_entropy_forward(loss.data(), logits.data(), tgt.data(), N, V);
  for (int64_t n = 0; n < N; ++n) {
    const double ref = tgt[n] < 0 ? 0.0 : ref_loss(logits.data() + n * V, V, tgt[n]);
    EXPECT_NEAR(loss[n], ref, 1e-5 * (1.0 + std::fabs(ref))) << n;
  }
  tgt[4] = 50;
  try {
    kc::cross_entropy_forward(loss.data(), logits.data(), tgt.data(), N, V);
    FAIL() << "expected out_of_range";
  } catch (const troupe::runtime::error& e) {
    EXPECT_EQ(e.code(), errc::out_of_range);
    EXPECT_NE(e.message().find("position 4"), std::string::npos) << e.message();
  }
}

TEST(cross_entropy, fused_classifier_equals_unfused) {
  const int64_t N = 23, C = 24, V = 97;
  auto h = randn(N * C, 2), W = randn(V * C, 3, 0.5f);
  std::vector<int32_t> tgt(N);
  for (int64_t n = 0; n < N; ++n) tgt[n] = static_cast<int32_t>((n * 37 + 5) % V);
  tgt[3] = tgt[10] = tgt[22] = -100;
  const float grad_scale = 1.0f / 20.0f;

  // Unfused: logits = h W^T; loss; dlogits = (softmax - onehot) * scale; dh = dlogits W; dW = dlogits^T h.
  std::vector<float> logits(N * V), ref_losses(N), dlogits(N * V, 0.0f);
  kc::matmul_forward(logits.data(), h.data(), W.data(), nullptr, N, C, V);
  kc::cross_entropy_forward(ref_losses.data(), logits.data(), tgt.data(), N, V);
  for (int64_t n = 0; n < N; ++n) {
    if (tgt[n] < 0) continue;
    double mx = -1e300, s = 0;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(logits[n * V + i]));
    for (int64_t i = 0; i < V; ++i) s += std::exp(logits[n * V + i] - mx);
    for (int64_t i = 0; i < V; ++i)
      dlogits[n * V + i] = float((std::exp(logits[n * V + i] - mx) / s - (i == tgt[n])) * grad_scale);
  }
  std::vector<float> ref_dh(N * C), ref_dW(V * C, 0.125f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t i = 0; i < V; ++i) s += double(dlogits[n * V + i]) * W[i * C + c];
      ref_dh[n * C + c] = float(s);
    }
  for (int64_t i = 0; i < V; ++i)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.125;
      for (int64_t n = 0; n < N; ++n) s += double(dlogits[n * V + i]) * h[n * C + c];
      ref_dW[i * C + c] = float(s);
    }

  for (int64_t chunk : {int64_t{1}, int64_t{7}, N, int64_t{1000}}) {
    SCOPED_TRACE(chunk);
    std::vector<float> losses(N, -1.0f), dh(N * C, 42.0f), dW(V * C, 0.125f);
    kc::classifier_forward_backward(losses.data(), dh.data(), dW.data(), h.data(), W.data(), tgt.data(), N, C, V,
                                    grad_scale, chunk);
    EXPECT_LT(rel_err(losses, ref_losses), 1e-5);
    EXPECT_LT(rel_err(dh, ref_dh), 1e-5);
    EXPECT_LT(rel_err(dW, ref_dW), 1e-5);
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dh[3 * C + c], 0.0f);  // ignored target: no gradient
    EXPECT_EQ(losses[10], 0.0f);
    // Loss only: no gradient buffers.
    std::vector<float> l2(N);
    kc::classifier_forward_backward(l2.data(), nullptr, nullptr, h.data(), W.data(), tgt.data(), N, C, V, 1.0f,
                                    chunk);
    EXPECT_EQ(l2, losses);
  }
}

TEST(cross_entropy, classifier_gradient_matches_finite_differences) {
  const int64_t N = 4, C = 5, V = 9;
  auto h = randn(N * C, 4), W = randn(V * C, 5);
  std::vector<int32_t> tgt = {2, -100, 8, 0};
  auto total = [&](const std::vector<double>& hd, const std::vector<double>& Wd) {
    double L = 0;
    for (int64_t n = 0; n < N; ++n) {
      if (tgt[n] < 0) continue;
      std::vector<double> z(V);
      double mx = -1e300, s = 0;
      for (int64_t i = 0; i < V; ++i) {
        z[i] = 0;
        for (int64_t c = 0; c < C; ++c) z[i] += hd[n * C + c] * Wd[i * C + c];
        mx = std::max(mx, z[i]);
      }
      for (int64_t i = 0; i < V; ++i) s += std::exp(z[i] - mx);
      L += std::log(s) + mx - z[tgt[n]];
    }
    return L * 0.5;  // grad_scale
  };
  std::vector<float> losses(N), dh(N * C), dW(V * C, 0.0f);
  kc::classifier_forward_backward(losses.data(), dh.data(), dW.data(), h.data(), W.data(), tgt.data(), N, C, V,
                                  0.5f, 3);
  auto hd = dense_test::to_double(h), Wd = dense_test::to_double(W);
  EXPECT_LT(rel_err(dh, dense_test::fd_grad([&](const std::vector<double>& p) { return total(p, Wd); }, hd)), 1e-5);
  EXPECT_LT(rel_err(dW, dense_test::fd_grad([&](const std::vector<double>& p) { return total(hd, p); }, Wd)), 1e-5);
}

TEST(cross_entropy, classifier_rejects_target_past_vocab) {
  const int64_t N = 3, C = 2, V = 4;
  std::vector<float> h(N * C, 1.0f), W(V * C, 1.0f), losses(N), dW(V * C, 0.0f);
  std::vector<int32_t> tgt = {0, 1, 4};
  try {
    kc::classifier_forward_backward(losses.data(), nullptr, dW.data(), h.data(), W.data(), tgt.data(), N, C, V,
                                    1.0f, 2);
    FAIL() << "expected out_of_range";
  } catch (const troupe::runtime::error& e) {
    EXPECT_EQ(e.code(), errc::out_of_range);
    EXPECT_NE(e.message().find("position 2"), std::string::npos) << e.message();
  }
  for (float x : dW) EXPECT_EQ(x, 0.0f);  // nothing accumulated before the check
  EXPECT_THROW(kc::classifier_forward_backward(losses.data(), nullptr, nullptr, h.data(), W.data(), tgt.data(), N,
                                               C, V, 1.0f, 0),
               troupe::runtime::error);
}
