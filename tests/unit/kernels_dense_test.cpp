// tests/unit/kernels_dense_test.cpp — CPU embedding, matmul, rmsnorm, rope, swiglu and
// AdamW against naive double-precision references, backward against finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "dense_test_util.h"
#include "kernels/adamw.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/error.h"
#include "runtime/threads.h"

namespace kc = troupe::kernels::cpu;
using dense_test::dot;
using dense_test::fd_grad;
using dense_test::randn;
using dense_test::rel_err;
using dense_test::to_double;
using troupe::runtime::errc;

// ---------------------------------------------------------------- embedding
TEST(embedding, forward_backward_and_bounds) {
  const int64_t N = 9, C = 300, V = 5;  // C > one column block
  std::vector<int32_t> ids = {3, 0, 4, 3, 3, 1, 0, 2, 3};
  auto wte = randn(V * C, 1);
  std::vector<float> out(N * C);
  kc::embedding_forward(out.data(), ids.data(), wte.data(), N, C, V);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) ASSERT_EQ(out[n * C + c], wte[ids[n] * C + c]);

  auto dout = randn(N * C, 2);
  std::vector<float> dwte(V * C, 0.5f);
  kc::embedding_backward(dwte.data(), dout.data(), ids.data(), N, C, V);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t c = 0; c < C; ++c) {
      float ref = 0.5f;  // token order, as the contract says: bitwise equal
      for (int64_t n = 0; n < N; ++n)
        if (ids[n] == v) ref += dout[n * C + c];
      ASSERT_EQ(dwte[v * C + c], ref);
    }

  ids[6] = 5;
  std::vector<float> untouched = out;
  try {
    kc::embedding_forward(out.data(), ids.data(), wte.data(), N, C, V);
    FAIL() << "expected out_of_range";
  } catch (const troupe::runtime::error& e) {
    EXPECT_EQ(e.code(), errc::out_of_range);
    EXPECT_NE(e.message().find("position 6"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("id 5"), std::string::npos) << e.message();
  }
  EXPECT_EQ(out, untouched);  // nothing written
  ids[6] = -1;
  EXPECT_THROW(kc::embedding_backward(dwte.data(), dout.data(), ids.data(), N, C, V), troupe::runtime::error);
}

// ---------------------------------------------------------------- matmul
namespace {
std::vector<double> ref_matmul(const std::vector<double>& x, const std::vector<double>& w,
                               const std::vector<double>* b, int64_t N, int64_t C, int64_t OC) {
  std::vector<double> y(N * OC);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = b ? (*b)[o] : 0.0;
      for (int64_t c = 0; c < C; ++c) s += x[n * C + c] * w[o * C + c];
      y[n * OC + o] = s;
    }
  return y;
}
}  // namespace

TEST(matmul, forward_matches_reference) {
  const int64_t N = 37, C = 53, OC = 70;
  auto x = randn(N * C, 3), w = randn(OC * C, 4), b = randn(OC, 5);
  std::vector<float> y(N * OC);
  auto bd = to_double(b);
  kc::matmul_forward(y.data(), x.data(), w.data(), b.data(), N, C, OC);
  EXPECT_LT(rel_err(y, ref_matmul(to_double(x), to_double(w), &bd, N, C, OC)), 1e-5);
  kc::matmul_forward(y.data(), x.data(), w.data(), nullptr, N, C, OC);
  EXPECT_LT(rel_err(y, ref_matmul(to_double(x), to_double(w), nullptr, N, C, OC)), 1e-5);
}

TEST(matmul, backward_matches_finite_differences) {
  const int64_t N = 5, C = 7, OC = 6;
  auto x = randn(N * C, 6), w = randn(OC * C, 7), b = randn(OC, 8), dout = randn(N * OC, 9);
  std::vector<float> dx(N * C, 99.0f), dw(OC * C, 0.25f), db(OC, -0.5f);
  kc::matmul_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, C, OC);
  auto xd = to_double(x), wd = to_double(w), bd = to_double(b);
  auto gx = fd_grad([&](const std::vector<double>& p) { return dot(ref_matmul(p, wd, &bd, N, C, OC), dout); }, xd);
  auto gw = fd_grad([&](const std::vector<double>& p) { return dot(ref_matmul(xd, p, &bd, N, C, OC), dout); }, wd);
  auto gb = fd_grad([&](const std::vector<double>& p) { return dot(ref_matmul(xd, wd, &p, N, C, OC), dout); }, bd);
  for (auto& g : gw) g += 0.25;  // param grads accumulate
  for (auto& g : gb) g -= 0.5;
  EXPECT_LT(rel_err(dx, gx), 1e-5);  // dinp is written, not accumulated
  EXPECT_LT(rel_err(dw, gw), 1e-5);
  EXPECT_LT(rel_err(db, gb), 1e-5);
  // Nullable outputs: only dbias.
  std::vector<float> db2(OC, 0.0f);
  kc::matmul_backward(nullptr, nullptr, db2.data(), dout.data(), x.data(), w.data(), N, C, OC);
  for (int64_t o = 0; o < OC; ++o) EXPECT_FLOAT_EQ(db2[o], db[o] + 0.5f);
}

// ---------------------------------------------------------------- rmsnorm
namespace {
std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<double>& w, int64_t N, int64_t C,
                                double eps) {
  std::vector<double> y(N * C);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += x[n * C + c] * x[n * C + c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) y[n * C + c] = w[c] * x[n * C + c] * r;
  }
  return y;
}
}  // namespace

TEST(rmsnorm, forward_in_place_and_backward) {
  const int64_t N = 6, C = 70;
  const float eps = 1e-5f;
  auto x = randn(N * C, 10, 2.0f), w = randn(C, 11), dout = randn(N * C, 12);
  std::vector<float> y(N * C), rstd(N);
  kc::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, C, eps);
  auto xd = to_double(x), wd = to_double(w);
  EXPECT_LT(rel_err(y, ref_rmsnorm(xd, wd, N, C, eps)), 1e-6);
  std::vector<float> inplace = x;
  kc::rmsnorm_forward(inplace.data(), nullptr, inplace.data(), w.data(), N, C, eps);
  EXPECT_EQ(inplace, y);

  std::vector<float> dx(N * C, 7.0f), dw(C, 1.0f);
  kc::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C);
  auto gx = fd_grad([&](const std::vector<double>& p) { return dot(ref_rmsnorm(p, wd, N, C, eps), dout); }, xd);
  auto gw = fd_grad([&](const std::vector<double>& p) { return dot(ref_rmsnorm(xd, p, N, C, eps), dout); }, wd);
  for (auto& g : gw) g += 1.0;
  EXPECT_LT(rel_err(dx, gx), 1e-4);
  EXPECT_LT(rel_err(dw, gw), 1e-4);
}

// ---------------------------------------------------------------- rope
namespace {
// HF: q * cos + rotate_half(q) * sin, with cos/sin duplicated over both halves.
std::vector<double> ref_rope(const std::vector<double>& x, const std::vector<float>& cs, const std::vector<float>& sn,
                             int64_t B, int64_t T, int64_t NH, int64_t HD, int64_t rot) {
  std::vector<double> y = x;
  const int64_t h = rot / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < NH; ++n) {
        const int64_t o = ((b * T + t) * NH + n) * HD;
        for (int64_t i = 0; i < rot; ++i) {
          const double rh = i < h ? -x[o + i + h] : x[o + i - h];
          y[o + i] = x[o + i] * cs[t * h + i % h] + rh * sn[t * h + i % h];
        }
      }
  return y;
}
}  // namespace

TEST(rope, forward_backward_partial_rotary) {
  const int64_t B = 2, T = 5, NH = 3, HD = 12;
  for (int64_t rot : {HD, int64_t{8}}) {
    troupe::kernels::rope_params p;
    p.rotary_dim = rot;
    for (int64_t i = 0; i < rot / 2; ++i) p.inv_freq.push_back(std::pow(10000.0f, -2.0f * i / rot));
    std::vector<int64_t> pos = {0, 3, 7, 100, 4096};
    std::vector<float> cs(T * rot / 2), sn(T * rot / 2);
    troupe::kernels::rope_build_table(cs.data(), sn.data(), pos.data(), T, p);
    EXPECT_FLOAT_EQ(cs[1 * rot / 2 + 0], std::cos(3.0f));
    auto x = randn(B * T * NH * HD, 13), dout = randn(B * T * NH * HD, 14);
    std::vector<float> y(x.size());
    kc::rope_forward(y.data(), x.data(), cs.data(), sn.data(), B, T, NH, HD, rot);
    auto xd = to_double(x);
    EXPECT_LT(rel_err(y, ref_rope(xd, cs, sn, B, T, NH, HD, rot)), 1e-6);
    std::vector<float> inplace = x;
    kc::rope_forward(inplace.data(), inplace.data(), cs.data(), sn.data(), B, T, NH, HD, rot);
    EXPECT_EQ(inplace, y);

    std::vector<float> dx(x.size());
    kc::rope_backward(dx.data(), dout.data(), cs.data(), sn.data(), B, T, NH, HD, rot);
    auto gx = fd_grad([&](const std::vector<double>& q) { return dot(ref_rope(q, cs, sn, B, T, NH, HD, rot), dout); },
                      xd);
    EXPECT_LT(rel_err(dx, gx), 1e-5);
    // In-place backward, and backward undoes forward (rotation is orthogonal).
    kc::rope_backward(inplace.data(), inplace.data(), cs.data(), sn.data(), B, T, NH, HD, rot);
    EXPECT_LT(rel_err(inplace, x), 1e-5);
  }
  std::vector<float> buf(HD);
  EXPECT_THROW(kc::rope_forward(buf.data(), buf.data(), buf.data(), buf.data(), 1, 1, 1, HD, 7),
               troupe::runtime::error);
}

// ---------------------------------------------------------------- swiglu
namespace {
std::vector<double> ref_swiglu(const std::vector<double>& g, const std::vector<double>& u) {
  std::vector<double> y(g.size());
  for (size_t i = 0; i < g.size(); ++i) y[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  return y;
}
}  // namespace

TEST(swiglu, forward_backward_and_extremes) {
  const int64_t N = 4, I = 33;
  auto g = randn(N * I, 15, 3.0f), u = randn(N * I, 16), dout = randn(N * I, 17);
  g[0] = 90.0f, g[1] = -90.0f, g[2] = -200.0f;  // exp overflow territory
  std::vector<float> y(N * I), dg(N * I), du(N * I);
  kc::swiglu_forward(y.data(), g.data(), u.data(), N, I);
  auto gd = to_double(g), ud = to_double(u);
  EXPECT_LT(rel_err(y, ref_swiglu(gd, ud)), 1e-6);
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
  kc::swiglu_backward(dg.data(), du.data(), dout.data(), g.data(), u.data(), N, I);
  auto fg = fd_grad([&](const std::vector<double>& p) { return dot(ref_swiglu(p, ud), dout); }, gd);
  auto fu = fd_grad([&](const std::vector<double>& p) { return dot(ref_swiglu(gd, p), dout); }, ud);
  EXPECT_LT(rel_err(dg, fg), 1e-5);
  EXPECT_LT(rel_err(du, fu), 1e-5);
  for (float v : dg) EXPECT_TRUE(std::isfinite(v));
}

// ---------------------------------------------------------------- adamw
TEST(adamw, matches_torch_golden) {
  // Golden from torch 2.x (tooling only), float32-representable hyperparameters:
  //   f = lambda x: float(np.float32(x))
  //   p = torch.nn.Parameter(torch.tensor([0.5, -1.25, 2.0, 0.0, 3e-3, -0.75]))
  //   opt = torch.optim.AdamW([p], lr=f(1e-2), betas=(f(0.9), f(0.95)), eps=f(1e-8), weight_decay=f(0.1))
  //   for g in grads: p.grad = torch.tensor(g); opt.step(); print(p)
  std::vector<float> p = {0.5f, -1.25f, 2.0f, 0.0f, 3e-3f, -0.75f};
  const std::vector<std::vector<float>> grads = {{0.1f, -0.2f, 0.3f, 1.0f, -5.0f, 0.0f},
                                                 {-0.05f, 0.4f, 0.3f, -1.0f, 2.5f, 1e-3f},
                                                 {0.2f, 0.2f, -0.6f, 0.5f, 0.0f, -2.0f}};
  const std::vector<std::vector<float>> golden = {
      {4.895000160e-01f, -1.238749981e+00f, 1.988000035e+00f, -9.999999776e-03f, 1.299699955e-02f,
       -7.492499948e-01f},
      {4.863268137e-01f, -1.241145015e+00f, 1.976012111e+00f, -9.463684633e-03f, 1.566769741e-02f,
       -7.558502555e-01f},
      {4.793530405e-01f, -1.245097518e+00f, 1.974783182e+00f, -1.121643838e-02f, 1.775335707e-02f,
       -7.488650084e-01f}};
  const std::vector<float> golden_m = {2.360000461e-02f, 3.980001062e-02f, -8.700007573e-03f,
                                       4.100000858e-02f, -1.800000370e-01f, -1.999100447e-01f};
  const std::vector<float> golden_v = {2.570000710e-03f, 1.140500326e-02f, 2.633625828e-02f,
                                       1.051250249e-01f, 1.425000310e+00f, 2.000000924e-01f};
  troupe::kernels::adamw_params hp{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  std::vector<float> m(p.size(), 0.0f), v(p.size(), 0.0f);
  // Independent double-precision formula, run alongside.
  std::vector<double> pd(p.begin(), p.end()), md(p.size(), 0.0), vd(p.size(), 0.0);
  for (size_t s = 0; s < grads.size(); ++s) {
    const int64_t step = static_cast<int64_t>(s) + 1;
    kc::adamw_update(p.data(), grads[s].data(), m.data(), v.data(), static_cast<int64_t>(p.size()), hp, step);
    const double b1 = hp.beta1, b2 = hp.beta2, lr = hp.lr;
    for (size_t i = 0; i < p.size(); ++i) {
      const double g = grads[s][i];
      pd[i] *= 1.0 - lr * hp.weight_decay;
      md[i] = b1 * md[i] + (1 - b1) * g;
      vd[i] = b2 * vd[i] + (1 - b2) * g * g;
      const double mh = md[i] / (1 - std::pow(b1, step)), vh = vd[i] / (1 - std::pow(b2, step));
      pd[i] -= lr * mh / (std::sqrt(vh) + hp.eps);
    }
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_NEAR(p[i], golden[s][i], 2e-7 * (1.0 + std::fabs(golden[s][i]))) << "step " << step << " i " << i;
      EXPECT_NEAR(p[i], pd[i], 1e-6 * (1.0 + std::fabs(pd[i]))) << "step " << step << " i " << i;
    }
  }
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_NEAR(m[i], golden_m[i], 1e-6 * (1.0 + std::fabs(golden_m[i])));
    EXPECT_NEAR(v[i], golden_v[i], 1e-6 * (1.0 + std::fabs(golden_v[i])));
  }
  EXPECT_THROW(kc::adamw_update(p.data(), grads[0].data(), m.data(), v.data(), 6, hp, 0), troupe::runtime::error);
}

TEST(adamw, weight_decay_only_and_thread_independent) {
  const int64_t n = 10000;
  troupe::kernels::adamw_params hp{.lr = 0.05f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.2f};
  auto p = randn(n, 18);
  const std::vector<float> p0 = p;
  std::vector<float> g(n, 0.0f), m(n, 0.0f), v(n, 0.0f);
  for (int64_t s = 1; s <= 3; ++s) kc::adamw_update(p.data(), g.data(), m.data(), v.data(), n, hp, s);
  const double decay = std::pow(1.0 - 0.05 * 0.2, 3);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_NEAR(p[i], p0[i] * decay, 1e-6 * (1.0 + std::fabs(p0[i])));
    ASSERT_EQ(m[i], 0.0f);
    ASSERT_EQ(v[i], 0.0f);
  }
  // Elementwise: bitwise equal with 1 and 2 threads.
  auto grad = randn(n, 19);
  std::vector<float> pa = p0, ma(n, 0.1f), va(n, 0.2f), pb = p0, mb(n, 0.1f), vb(n, 0.2f);
  dense_test::with_threads(1, [&] { kc::adamw_update(pa.data(), grad.data(), ma.data(), va.data(), n, hp, 5); });
  dense_test::with_threads(2, [&] { kc::adamw_update(pb.data(), grad.data(), mb.data(), vb.data(), n, hp, 5); });
  EXPECT_EQ(pa, pb);
  EXPECT_EQ(ma, mb);
  EXPECT_EQ(va, vb);
}

// ---------------------------------------------------------------- determinism
TEST(dense_kernels, bitwise_equal_with_one_and_two_threads) {
  const int64_t N = 300, C = 200, OC = 130, V = 50;
  auto x = randn(N * C, 20), w = randn(OC * C, 21), dout = randn(N * OC, 22), rw = randn(C, 23);
  auto dn = randn(N * C, 24), W = randn(V * C, 25);
  std::vector<int32_t> ids(N), tgt(N);
  for (int64_t n = 0; n < N; ++n) ids[n] = static_cast<int32_t>((n * 7) % V), tgt[n] = n % 5 ? ids[n] : -100;
  std::vector<std::vector<float>> res[2];
  for (int t = 0; t < 2; ++t) {
    troupe::runtime::set_num_threads(t + 1);  // OpenMP and OpenBLAS
    std::vector<float> dx(N * C), dw(OC * C, 0.0f), db(OC, 0.0f), y(N * C), rstd(N), rdx(N * C), rdw(C, 0.0f),
        dwte(V * C, 0.0f), loss(N), dh(N * C), dW(V * C, 0.0f);
    kc::matmul_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, C, OC);
    kc::rmsnorm_forward(y.data(), rstd.data(), x.data(), rw.data(), N, C, 1e-6f);
    kc::rmsnorm_backward(rdx.data(), rdw.data(), dn.data(), x.data(), rw.data(), rstd.data(), N, C);
    kc::embedding_backward(dwte.data(), dn.data(), ids.data(), N, C, V);
    kc::classifier_forward_backward(loss.data(), dh.data(), dW.data(), x.data(), W.data(), tgt.data(), N, C, V,
                                    0.01f, 64);
    res[t] = {dx, dw, db, y, rdx, rdw, dwte, loss, dh, dW};
  }
  troupe::runtime::set_num_threads(0);
  for (size_t i = 0; i < res[0].size(); ++i) EXPECT_EQ(res[0][i], res[1][i]) << "output " << i;
}
