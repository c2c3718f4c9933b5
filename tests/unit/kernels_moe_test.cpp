// MoE cpu kernels: router softmax/top-k, permutation plan, permute/unpermute and the
// grouped SwiGLU expert FFN, against naive double-precision references and finite
// differences; the whole layer against a per-token loop.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/moe.h"
#include "runtime/error.h"

namespace {

using namespace troupe::kernels;
using troupe::runtime::errc;
using troupe::runtime::error;

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double rtol, double atol,
                  const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], atol + rtol * std::abs(want[i])) << what << " at " << i;
}

// Naive router: softmax in double, stable sort by descending probability.
struct router_ref {
  std::vector<double> probs;
  std::vector<int32_t> idx;
  std::vector<double> w;
};
router_ref naive_router(const std::vector<float>& logits, int64_t N, int64_t E, int64_t K, bool normalize) {
  router_ref r;
  r.probs.resize(N * E);
  for (int64_t n = 0; n < N; ++n) {
    double mx = -1e300, sum = 0.0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(logits[n * E + e]));
    for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[n * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) r.probs[n * E + e] = std::exp(logits[n * E + e] - mx) / sum;
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return static_cast<float>(r.probs[n * E + a]) > static_cast<float>(r.probs[n * E + b]);
    });
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += r.probs[n * E + order[k]];
    for (int64_t k = 0; k < K; ++k) {
      r.idx.push_back(order[k]);
      r.w.push_back(normalize ? r.probs[n * E + order[k]] / s : r.probs[n * E + order[k]]);
    }
  }
  return r;
}

// Row-major (rows, C) x W^T with W (O, C), in double.
std::vector<double> naive_ffn_row(const float* x, const float* wg, const float* wu, const float* wd, int64_t C,
                                  int64_t I) {
  std::vector<double> a(I), y(C, 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (int64_t c = 0; c < C; ++c) {
      g += static_cast<double>(x[c]) * wg[i * C + c];
      u += static_cast<double>(x[c]) * wu[i * C + c];
    }
    a[i] = silu(g) * u;
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < I; ++i) y[c] += a[i] * wd[c * I + i];
  return y;
}

struct experts {
  int64_t E, C, I;
  std::vector<std::vector<float>> wg, wu, wd;
  std::vector<const float*> pg, pu, pd;
  experts(int64_t E_, int64_t C_, int64_t I_, uint32_t seed) : E(E_), C(C_), I(I_) {
    for (int64_t e = 0; e < E; ++e) {
      wg.push_back(randn(I * C, seed + 3 * e, 0.4f));
      wu.push_back(randn(I * C, seed + 3 * e + 1, 0.4f));
      wd.push_back(randn(C * I, seed + 3 * e + 2, 0.4f));
    }
    for (int64_t e = 0; e < E; ++e) {
      pg.push_back(wg[e].data());
      pu.push_back(wu[e].data());
      pd.push_back(wd[e].data());
    }
  }
};

TEST(MoeRouter, ForwardMatchesNaiveSoftmaxAndTopK) {
  const int64_t N = 37, E = 8, K = 3;
  auto logits = randn(N * E, 1, 2.0f);
  // Row 0: all equal -> ties broken by the lower id. Row 1: a tie between experts 5 and 2.
  for (int64_t e = 0; e < E; ++e) logits[e] = 0.5f;
  for (int64_t e = 0; e < E; ++e) logits[E + e] = -1.0f;
  logits[E + 5] = 2.0f;
  logits[E + 2] = 2.0f;
  for (bool normalize : {true, false}) {
    std::vector<float> probs(N * E), w(N * K);
    std::vector<int32_t> idx(N * K);
    cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, normalize);
    auto ref = naive_router(logits, N, E, K, normalize);
    expect_close(probs, ref.probs, 1e-5, 1e-7, "probs");
    EXPECT_EQ(idx, ref.idx);
    expect_close(w, ref.w, 1e-5, 1e-7, "topk_w");
    EXPECT_EQ((std::vector<int32_t>{idx[0], idx[1], idx[2]}), (std::vector<int32_t>{0, 1, 2}));
    EXPECT_EQ((std::vector<int32_t>{idx[K], idx[K + 1]}), (std::vector<int32_t>{2, 5}));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 1; k < K; ++k) EXPECT_GE(w[n * K + k - 1], w[n * K + k]);
      if (normalize) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += w[n * K + k];
        EXPECT_NEAR(s, 1.0, 1e-6);
      }
    }
  }
}

TEST(MoeRouter, RejectsBadTopK) {
  std::vector<float> logits(8), probs(8), w(8);
  std::vector<int32_t> idx(8);
  try {
    cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), 2, 4, 5, true);
    FAIL() << "K > E accepted";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("K=5"), std::string::npos) << e.what();
  }
}

TEST(MoeRouter, BackwardMatchesFiniteDifferences) {
  const int64_t N = 5, E = 6, K = 2;
  // Well separated logits so that h does not change the top-k selection.
  std::vector<float> logits(N * E);
  std::mt19937 gen(7);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<float> vals(E);
    for (int64_t e = 0; e < E; ++e) vals[e] = 0.3f * static_cast<float>(e) - 0.8f;
    std::shuffle(vals.begin(), vals.end(), gen);
    std::copy(vals.begin(), vals.end(), logits.begin() + n * E);
  }
  const auto G = randn(N * K, 8);  // loss = sum G * topk_w
  for (bool normalize : {true, false}) {
    std::vector<float> probs(N * E), w(N * K), dlogits(N * E, 123.0f);
    std::vector<int32_t> idx(N * K);
    cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, normalize);
    cpu::moe_router_backward(dlogits.data(), G.data(), probs.data(), idx.data(), w.data(), N, E, K, normalize);
    auto loss = [&](const std::vector<float>& l) {
      auto r = naive_router(l, N, E, K, normalize);
      EXPECT_EQ(r.idx, idx);
      double s = 0;
      for (int64_t i = 0; i < N * K; ++i) s += G[i] * r.w[i];
      return s;
    };
    const float h = 1e-3f;
    for (int64_t i = 0; i < N * E; ++i) {
      auto lp = logits, lm = logits;
      lp[i] += h;
      lm[i] -= h;
      const double fd = (loss(lp) - loss(lm)) / (static_cast<double>(lp[i]) - lm[i]);
      ASSERT_NEAR(dlogits[i], fd, 1e-4 + 1e-3 * std::abs(fd)) << "normalize=" << normalize << " i=" << i;
    }
  }
}

TEST(MoePermute, PlanIsAGroupedBijection) {
  const int64_t N = 50, E = 7, K = 3;
  std::vector<float> probs(N * E), w(N * K);
  std::vector<int32_t> idx(N * K);
  auto logits = randn(N * E, 11);
  cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, true);
  std::vector<int32_t> off(E + 1), row_slot(N * K), slot_row(N * K);
  cpu::moe_permute_plan(off.data(), row_slot.data(), slot_row.data(), idx.data(), N, E, K);
  EXPECT_EQ(off[0], 0);
  EXPECT_EQ(off[E], N * K);
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_EQ(off[e + 1] - off[e], std::count(idx.begin(), idx.end(), static_cast<int32_t>(e))) << "expert " << e;
    for (int32_t s = off[e]; s < off[e + 1]; ++s) {
      EXPECT_EQ(idx[slot_row[s]], e) << "slot " << s;
      if (s > off[e]) {
        EXPECT_LT(slot_row[s - 1], slot_row[s]) << "(token, k) order inside expert " << e;
      }
    }
  }
  for (int64_t r = 0; r < N * K; ++r) EXPECT_EQ(slot_row[row_slot[r]], r);
  for (int64_t s = 0; s < N * K; ++s) EXPECT_EQ(row_slot[slot_row[s]], s);
}

TEST(MoePermute, PlanRejectsExpertIdOutOfRange) {
  const int64_t N = 3, E = 4, K = 2;
  std::vector<int32_t> off(E + 1), row_slot(N * K), slot_row(N * K);
  for (int32_t bad : {-1, 4, 100}) {
    std::vector<int32_t> idx = {0, 1, 2, bad, 3, 0};
    try {
      cpu::moe_permute_plan(off.data(), row_slot.data(), slot_row.data(), idx.data(), N, E, K);
      FAIL() << "expert id " << bad << " accepted";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::out_of_range);
      EXPECT_NE(std::string(e.what()).find("token 1"), std::string::npos) << e.what();
    }
  }
}

TEST(MoePermute, PermuteUnpermuteAndBackwards) {
  const int64_t N = 9, E = 4, K = 2, C = 5;
  std::vector<float> probs(N * E), w(N * K);
  std::vector<int32_t> idx(N * K);
  auto logits = randn(N * E, 21);
  cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, true);
  std::vector<int32_t> off(E + 1), row_slot(N * K), slot_row(N * K);
  cpu::moe_permute_plan(off.data(), row_slot.data(), slot_row.data(), idx.data(), N, E, K);

  auto x = randn(N * C, 22);
  std::vector<float> xp(N * K * C);
  cpu::moe_permute(xp.data(), x.data(), slot_row.data(), N * K, K, C);
  for (int64_t s = 0; s < N * K; ++s)
    for (int64_t c = 0; c < C; ++c) ASSERT_EQ(xp[s * C + c], x[(slot_row[s] / K) * C + c]);

  auto dxp = randn(N * K * C, 23);
  std::vector<float> dx(N * C, 9.0f);
  cpu::moe_permute_backward(dx.data(), dxp.data(), row_slot.data(), N, K, C);
  std::vector<double> dx_ref(N * C, 0.0);
  for (int64_t s = 0; s < N * K; ++s)
    for (int64_t c = 0; c < C; ++c) dx_ref[(slot_row[s] / K) * C + c] += dxp[s * C + c];
  expect_close(dx, dx_ref, 1e-6, 1e-6, "permute_backward");

  // unpermute: out[n] = sum_k w[n,k] yp[row_slot[n*K+k]]
  auto yp = randn(N * K * C, 24);
  std::vector<float> out(N * C, 7.0f);
  cpu::moe_unpermute(out.data(), yp.data(), w.data(), row_slot.data(), N, K, C);
  std::vector<double> out_ref(N * C, 0.0);
  for (int64_t s = 0; s < N * K; ++s)
    for (int64_t c = 0; c < C; ++c)
      out_ref[(slot_row[s] / K) * C + c] += static_cast<double>(w[slot_row[s]]) * yp[s * C + c];
  expect_close(out, out_ref, 1e-6, 1e-6, "unpermute");

  // unpermute backward against finite differences of loss = sum G * out.
  auto G = randn(N * C, 25);
  std::vector<float> dyp(N * K * C, 5.0f), dw(N * K, 5.0f);
  cpu::moe_unpermute_backward(dyp.data(), dw.data(), G.data(), yp.data(), w.data(), row_slot.data(), N, K, C);
  auto loss = [&](const std::vector<float>& y, const std::vector<float>& ww) {
    std::vector<float> o(N * C);
    cpu::moe_unpermute(o.data(), y.data(), ww.data(), row_slot.data(), N, K, C);
    double s = 0;
    for (int64_t i = 0; i < N * C; ++i) s += static_cast<double>(G[i]) * o[i];
    return s;
  };
  const float h = 1e-2f;
  for (int64_t i = 0; i < N * K * C; ++i) {
    auto p = yp, m = yp;
    p[i] += h;
    m[i] -= h;
    const double fd = (loss(p, w) - loss(m, w)) / (static_cast<double>(p[i]) - m[i]);
    ASSERT_NEAR(dyp[i], fd, 1e-4 + 1e-3 * std::abs(fd)) << "dyp " << i;
  }
  for (int64_t i = 0; i < N * K; ++i) {
    auto p = w, m = w;
    p[i] += h;
    m[i] -= h;
    const double fd = (loss(yp, p) - loss(yp, m)) / (static_cast<double>(p[i]) - m[i]);
    ASSERT_NEAR(dw[i], fd, 1e-4 + 1e-3 * std::abs(fd)) << "dtopk_w " << i;
  }
}

// Offsets with an empty expert in the middle.
std::vector<int32_t> test_offsets() { return {0, 3, 3, 8, 10}; }

TEST(MoeExpertFfn, ForwardMatchesNaive) {
  const int64_t E = 4, C = 6, I = 10;
  auto off = test_offsets();
  const int64_t R = off[E];
  experts ex(E, C, I, 31);
  auto xp = randn(R * C, 32);
  std::vector<float> yp(R * C), hg(R * I), hu(R * I);
  cpu::moe_expert_ffn_forward(yp.data(), hg.data(), hu.data(), xp.data(), ex.pg.data(), ex.pu.data(), ex.pd.data(),
                              off.data(), E, C, I);
  std::vector<double> ref;
  for (int64_t e = 0; e < E; ++e)
    for (int32_t r = off[e]; r < off[e + 1]; ++r) {
      auto y = naive_ffn_row(xp.data() + r * C, ex.pg[e], ex.pu[e], ex.pd[e], C, I);
      ref.insert(ref.end(), y.begin(), y.end());
    }
  expect_close(yp, ref, 1e-5, 1e-6, "yp");
  // h_gate is the pre-activation x · Wg^T.
  for (int64_t i = 0; i < I; ++i) {
    double g = 0;
    for (int64_t c = 0; c < C; ++c) g += static_cast<double>(xp[4 * C + c]) * ex.wg[2][i * C + c];
    ASSERT_NEAR(hg[4 * I + i], g, 1e-5);
  }
}

TEST(MoeExpertFfn, BackwardMatchesFiniteDifferencesAndAccumulates) {
  const int64_t E = 4, C = 5, I = 7;
  auto off = test_offsets();
  const int64_t R = off[E];
  experts ex(E, C, I, 41);
  auto xp = randn(R * C, 42);
  auto G = randn(R * C, 43);  // loss = sum G * yp
  std::vector<float> yp(R * C), hg(R * I), hu(R * I);
  cpu::moe_expert_ffn_forward(yp.data(), hg.data(), hu.data(), xp.data(), ex.pg.data(), ex.pu.data(), ex.pd.data(),
                              off.data(), E, C, I);
  const float init = 0.25f;  // param grads accumulate on top of this
  std::vector<std::vector<float>> dwg(E, std::vector<float>(I * C, init)), dwu = dwg,
                                  dwd(E, std::vector<float>(C * I, init));
  std::vector<float*> pdg, pdu, pdd;
  for (int64_t e = 0; e < E; ++e) {
    pdg.push_back(dwg[e].data());
    pdu.push_back(dwu[e].data());
    pdd.push_back(dwd[e].data());
  }
  std::vector<float> dxp(R * C, 99.0f);
  cpu::moe_expert_ffn_backward(dxp.data(), pdg.data(), pdu.data(), pdd.data(), G.data(), xp.data(), hg.data(),
                               hu.data(), ex.pg.data(), ex.pu.data(), ex.pd.data(), off.data(), E, C, I);
  auto loss = [&]() {
    std::vector<float> y(R * C), g(R * I), u(R * I);
    cpu::moe_expert_ffn_forward(y.data(), g.data(), u.data(), xp.data(), ex.pg.data(), ex.pu.data(), ex.pd.data(),
                                off.data(), E, C, I);
    double s = 0;
    for (int64_t i = 0; i < R * C; ++i) s += static_cast<double>(G[i]) * y[i];
    return s;
  };
  const float h = 1e-2f;
  auto fd_of = [&](float& v) {
    const float v0 = v;
    v = v0 + h;
    const float vp = v;
    const double lp = loss();
    v = v0 - h;
    const float vm = v;
    const double lm = loss();
    v = v0;
    return (lp - lm) / (static_cast<double>(vp) - vm);
  };
  auto tol = [](double fd) { return 2e-3 + 5e-3 * std::abs(fd); };
  for (int64_t i = 0; i < R * C; ++i) {
    const double fd = fd_of(xp[i]);
    ASSERT_NEAR(dxp[i], fd, tol(fd)) << "dxp " << i;
  }
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < I * C; ++i) {
      double fd = fd_of(ex.wg[e][i]);
      ASSERT_NEAR(dwg[e][i] - init, fd, tol(fd)) << "dw_gate expert " << e << " at " << i;
      fd = fd_of(ex.wu[e][i]);
      ASSERT_NEAR(dwu[e][i] - init, fd, tol(fd)) << "dw_up expert " << e << " at " << i;
      fd = fd_of(ex.wd[e][i]);
      ASSERT_NEAR(dwd[e][i] - init, fd, tol(fd)) << "dw_down expert " << e << " at " << i;
    }
  }
  // The empty expert (1) got no gradient at all.
  for (float v : dwg[1]) ASSERT_EQ(v, init);
}

TEST(MoeLayer, PipelineMatchesPerTokenLoop) {
  const int64_t N = 23, E = 5, K = 2, C = 8, I = 12;
  auto logits = randn(N * E, 51, 1.5f);
  for (int64_t n = 0; n < N; ++n) logits[n * E + 3] = -50.0f;  // expert 3 gets no token
  experts ex(E, C, I, 52);
  auto x = randn(N * C, 53);

  std::vector<float> probs(N * E), w(N * K);
  std::vector<int32_t> idx(N * K);
  cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, true);
  std::vector<int32_t> off(E + 1), row_slot(N * K), slot_row(N * K);
  cpu::moe_permute_plan(off.data(), row_slot.data(), slot_row.data(), idx.data(), N, E, K);
  ASSERT_EQ(off[4], off[3]);
  std::vector<float> xp(N * K * C), yp(N * K * C), hg(N * K * I), hu(N * K * I), out(N * C);
  cpu::moe_permute(xp.data(), x.data(), slot_row.data(), N * K, K, C);
  cpu::moe_expert_ffn_forward(yp.data(), hg.data(), hu.data(), xp.data(), ex.pg.data(), ex.pu.data(), ex.pd.data(),
                              off.data(), E, C, I);
  cpu::moe_unpermute(out.data(), yp.data(), w.data(), row_slot.data(), N, K, C);

  auto ref_router = naive_router(logits, N, E, K, true);
  std::vector<double> ref(N * C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ref_router.idx[n * K + k];
      auto y = naive_ffn_row(x.data() + n * C, ex.pg[e], ex.pu[e], ex.pd[e], C, I);
      for (int64_t c = 0; c < C; ++c) ref[n * C + c] += ref_router.w[n * K + k] * y[c];
    }
  expect_close(out, ref, 1e-5, 1e-6, "moe layer output");
}

}  // namespace
