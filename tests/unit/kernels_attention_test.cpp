// tests/unit/kernels_attention_test.cpp — the CPU flash attention against naive softmax
// attention in double: several shapes (T not a tile multiple, GQA groups 1/2/4, decoding
// with a strided KV cache, sliding window), backward vs the naive gradient (itself checked
// against finite differences), and bitwise equality across thread counts.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dense_test_util.h"
#include "kernels/attention.h"
#include "runtime/error.h"

namespace kc = troupe::kernels::cpu;
using dense_test::fd_grad;
using dense_test::randn;
using dense_test::rel_err;
using dense_test::to_double;
using troupe::kernels::attention_dims;

namespace {

struct ref_out {
  std::vector<double> out, lse, dq, dk, dv;
};

double scale_of(const attention_dims& d) { return d.scale != 0.0f ? d.scale : 1.0 / std::sqrt(double(d.HD)); }
int64_t kv_sb(const attention_dims& d) { return d.kv_stride_b > 0 ? d.kv_stride_b : d.Tk * d.NKV * d.HD; }

// Naive causal GQA softmax attention in double; with dout, also its exact gradient
// (dk, dv dense (B, Tk, NKV, HD)).
ref_out ref_attention(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                      const attention_dims& d, const std::vector<float>* dout = nullptr) {
  const int64_t B = d.B, Tq = d.Tq, Tk = d.Tk, NH = d.NH, NKV = d.NKV, HD = d.HD, sb = kv_sb(d);
  const double sc = scale_of(d);
  ref_out r;
  r.out.assign(B * Tq * NH * HD, 0.0);
  r.lse.assign(B * NH * Tq, 0.0);
  if (dout) r.dq.assign(q.size(), 0.0), r.dk.assign(B * Tk * NKV * HD, 0.0), r.dv.assign(B * Tk * NKV * HD, 0.0);
  std::vector<double> p(Tk), dp(Tk);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t kh = h / (NH / NKV);
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t pos = Tk - Tq + i;
        const int64_t lo = d.window > 0 ? std::max<int64_t>(0, pos - d.window + 1) : 0;
        const double* qi = q.data() + ((b * Tq + i) * NH + h) * HD;
        double mx = -1e300;
        for (int64_t j = lo; j <= pos; ++j) {
          const double* kj = k.data() + b * sb + (j * NKV + kh) * HD;
          double s = 0;
          for (int64_t x = 0; x < HD; ++x) s += qi[x] * kj[x];
          p[j] = s * sc;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = lo; j <= pos; ++j) sum += std::exp(p[j] - mx);
        for (int64_t j = lo; j <= pos; ++j) p[j] = std::exp(p[j] - mx) / sum;
        r.lse[(b * NH + h) * Tq + i] = mx + std::log(sum);
        double* oi = r.out.data() + ((b * Tq + i) * NH + h) * HD;
        for (int64_t j = lo; j <= pos; ++j)
          for (int64_t x = 0; x < HD; ++x) oi[x] += p[j] * v[b * sb + (j * NKV + kh) * HD + x];
        if (!dout) continue;
        const float* gi = dout->data() + ((b * Tq + i) * NH + h) * HD;
        double dsum = 0;
        for (int64_t j = lo; j <= pos; ++j) {
          dp[j] = 0;
          for (int64_t x = 0; x < HD; ++x) {
            dp[j] += gi[x] * v[b * sb + (j * NKV + kh) * HD + x];
            r.dv[((b * Tk + j) * NKV + kh) * HD + x] += p[j] * gi[x];
          }
          dsum += p[j] * dp[j];
        }
        for (int64_t j = lo; j <= pos; ++j) {
          const double ds = p[j] * (dp[j] - dsum) * sc;
          for (int64_t x = 0; x < HD; ++x) {
            r.dq[((b * Tq + i) * NH + h) * HD + x] += ds * k[b * sb + (j * NKV + kh) * HD + x];
            r.dk[((b * Tk + j) * NKV + kh) * HD + x] += ds * qi[x];
          }
        }
      }
    }
  return r;
}

struct inputs {
  std::vector<float> q, k, v;
};
inputs make_inputs(const attention_dims& d, uint32_t seed) {
  inputs in;
  in.q = randn(d.B * d.Tq * d.NH * d.HD, seed, 1.5f);
  in.k = randn(d.B * kv_sb(d), seed + 1, 1.5f);
  in.v = randn(d.B * kv_sb(d), seed + 2);
  // Capacity past Tk in a KV cache must never be read: poison it.
  const int64_t used = d.Tk * d.NKV * d.HD;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t x = used; x < kv_sb(d); ++x)
      in.k[b * kv_sb(d) + x] = in.v[b * kv_sb(d) + x] = std::numeric_limits<float>::quiet_NaN();
  return in;
}

void check_forward(const attention_dims& d, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "B " << d.B << " Tq " << d.Tq << " Tk " << d.Tk << " NH " << d.NH << " NKV "
                                  << d.NKV << " HD " << d.HD << " window " << d.window << " kv_stride_b "
                                  << d.kv_stride_b);
  const inputs in = make_inputs(d, seed);
  std::vector<float> out(in.q.size()), lse(d.B * d.NH * d.Tq);
  kc::attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(), d);
  const ref_out r = ref_attention(to_double(in.q), to_double(in.k), to_double(in.v), d);
  EXPECT_LT(rel_err(out, r.out), 1e-5);
  EXPECT_LT(rel_err(lse, r.lse), 1e-5);
}

}  // namespace

TEST(attention, forward_matches_naive) {
  check_forward({.B = 2, .Tq = 130, .Tk = 130, .NH = 4, .NKV = 1, .HD = 20}, 1);    // group 4, ragged tiles
  check_forward({.B = 1, .Tq = 64, .Tk = 64, .NH = 2, .NKV = 2, .HD = 64}, 4);      // group 1, one exact tile
  check_forward({.B = 1, .Tq = 200, .Tk = 200, .NH = 4, .NKV = 2, .HD = 32}, 7);    // group 2
  check_forward({.B = 1, .Tq = 1, .Tk = 1, .NH = 1, .NKV = 1, .HD = 3}, 10);        // smallest
  check_forward({.B = 2, .Tq = 150, .Tk = 150, .NH = 2, .NKV = 1, .HD = 16, .window = 40}, 13);
  check_forward({.B = 1, .Tq = 70, .Tk = 70, .NH = 2, .NKV = 2, .HD = 8, .scale = 0.3f}, 16);
}

TEST(attention, forward_decoding_with_kv_cache) {
  // Tq < Tk: queries are the last Tq positions; the cache holds Tk + 37 slots per batch.
  check_forward({.B = 2, .Tq = 5, .Tk = 100, .NH = 4, .NKV = 2, .HD = 16, .kv_stride_b = 137 * 2 * 16}, 19);
  check_forward({.B = 2, .Tq = 1, .Tk = 129, .NH = 8, .NKV = 2, .HD = 24, .kv_stride_b = 200 * 2 * 24}, 22);
  check_forward({.B = 1, .Tq = 70, .Tk = 150, .NH = 4, .NKV = 1, .HD = 16, .window = 33,
                 .kv_stride_b = 160 * 1 * 16},
                25);
}

namespace {
void check_backward(const attention_dims& d, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "T " << d.Tq << " NH " << d.NH << " NKV " << d.NKV << " HD " << d.HD
                                  << " window " << d.window);
  const inputs in = make_inputs(d, seed);
  const auto dout = randn(in.q.size(), seed + 3);
  std::vector<float> out(in.q.size()), lse(d.B * d.NH * d.Tq);
  kc::attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(), d);
  std::vector<float> dq(in.q.size(), 9.0f), dk(d.B * d.Tk * d.NKV * d.HD, 9.0f), dv(dk.size(), 9.0f);
  kc::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), in.q.data(), in.k.data(), in.v.data(),
                         out.data(), lse.data(), d);
  const ref_out r = ref_attention(to_double(in.q), to_double(in.k), to_double(in.v), d, &dout);
  EXPECT_LT(rel_err(dq, r.dq), 1e-5);
  EXPECT_LT(rel_err(dk, r.dk), 1e-5);
  EXPECT_LT(rel_err(dv, r.dv), 1e-5);
}
}  // namespace

TEST(attention, naive_gradient_matches_finite_differences) {
  // The reference gradient used below is itself checked against central differences.
  const attention_dims d{.B = 1, .Tq = 6, .Tk = 6, .NH = 4, .NKV = 2, .HD = 3, .window = 4};
  const inputs in = make_inputs(d, 30);
  const auto dout = randn(in.q.size(), 33);
  auto qd = to_double(in.q), kd = to_double(in.k), vd = to_double(in.v);
  const ref_out r = ref_attention(qd, kd, vd, d, &dout);
  auto loss = [&](const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v) {
    return dense_test::dot(ref_attention(q, k, v, d).out, dout);
  };
  EXPECT_LT(rel_err(r.dq, fd_grad([&](const std::vector<double>& p) { return loss(p, kd, vd); }, qd)), 1e-7);
  EXPECT_LT(rel_err(r.dk, fd_grad([&](const std::vector<double>& p) { return loss(qd, p, vd); }, kd)), 1e-7);
  EXPECT_LT(rel_err(r.dv, fd_grad([&](const std::vector<double>& p) { return loss(qd, kd, p); }, vd)), 1e-7);
}

TEST(attention, backward_matches_naive_gradient) {
  check_backward({.B = 2, .Tq = 130, .Tk = 130, .NH = 4, .NKV = 2, .HD = 20}, 40);
  check_backward({.B = 1, .Tq = 150, .Tk = 150, .NH = 4, .NKV = 1, .HD = 16, .window = 50}, 44);
  check_backward({.B = 1, .Tq = 64, .Tk = 64, .NH = 1, .NKV = 1, .HD = 64}, 48);
  check_backward({.B = 1, .Tq = 100, .Tk = 100, .NH = 2, .NKV = 2, .HD = 8, .scale = 0.2f, .window = 7}, 52);
  // k, v in a larger KV buffer (batch stride > T * NKV * HD); dk, dv come back dense.
  check_backward({.B = 2, .Tq = 70, .Tk = 70, .NH = 2, .NKV = 1, .HD = 8, .kv_stride_b = 90 * 8}, 56);
}

TEST(attention, backward_vs_finite_differences_of_the_kernel_forward) {
  // The float kernel's own forward, differenced: spans two tiles, GQA group 2.
  const attention_dims d{.B = 1, .Tq = 67, .Tk = 67, .NH = 2, .NKV = 1, .HD = 4};
  inputs in = make_inputs(d, 60);
  const auto dout = randn(in.q.size(), 63);
  std::vector<float> out(in.q.size()), lse(d.NH * d.Tq), dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  kc::attention_forward(out.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(), d);
  kc::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), in.q.data(), in.k.data(), in.v.data(),
                         out.data(), lse.data(), d);
  auto loss = [&] {
    std::vector<float> o(in.q.size());
    kc::attention_forward(o.data(), nullptr, in.q.data(), in.k.data(), in.v.data(), d);
    double s = 0;
    for (size_t i = 0; i < o.size(); ++i) s += double(o[i]) * dout[i];
    return s;
  };
  const float h = 1e-2f;
  for (auto [x, g] : {std::pair{&in.q, &dq}, std::pair{&in.k, &dk}, std::pair{&in.v, &dv}}) {
    std::vector<double> fd(x->size());
    for (size_t i = 0; i < x->size(); i += 7) {  // a subset keeps it fast
      const float x0 = (*x)[i];
      (*x)[i] = x0 + h;
      const double fp = loss();
      (*x)[i] = x0 - h;
      const double fm = loss();
      (*x)[i] = x0;
      fd[i] = (fp - fm) / (2.0 * h);
    }
    std::vector<double> sub_g, sub_fd;
    for (size_t i = 0; i < x->size(); i += 7) sub_g.push_back((*g)[i]), sub_fd.push_back(fd[i]);
    EXPECT_LT(rel_err(sub_g, sub_fd), 1e-3);
  }
}

TEST(attention, bitwise_equal_across_thread_counts) {
  const attention_dims d{.B = 2, .Tq = 200, .Tk = 200, .NH = 4, .NKV = 2, .HD = 32, .window = 90};
  const inputs in = make_inputs(d, 70);
  const auto dout = randn(in.q.size(), 73);
  std::vector<float> out[2], lse[2], dq[2], dk[2], dv[2];
  for (int t = 0; t < 2; ++t) {
    out[t].resize(in.q.size()), lse[t].resize(d.B * d.NH * d.Tq);
    dq[t].resize(in.q.size()), dk[t].resize(in.k.size()), dv[t].resize(in.v.size());
    dense_test::with_threads(t + 1, [&] {
      kc::attention_forward(out[t].data(), lse[t].data(), in.q.data(), in.k.data(), in.v.data(), d);
      kc::attention_backward(dq[t].data(), dk[t].data(), dv[t].data(), dout.data(), in.q.data(), in.k.data(),
                             in.v.data(), out[t].data(), lse[t].data(), d);
    });
  }
  EXPECT_EQ(out[0], out[1]);
  EXPECT_EQ(lse[0], lse[1]);
  EXPECT_EQ(dq[0], dq[1]);
  EXPECT_EQ(dk[0], dk[1]);
  EXPECT_EQ(dv[0], dv[1]);
}

TEST(attention, rejects_bad_shapes) {
  std::vector<float> buf(4096);
  float* p = buf.data();
  using troupe::runtime::error;
  EXPECT_THROW(kc::attention_forward(p, p, p, p, p, {.NH = 3, .NKV = 2, .HD = 4}), error);
  EXPECT_THROW(kc::attention_forward(p, p, p, p, p, {.Tq = 5, .Tk = 4, .HD = 4}), error);
  EXPECT_THROW(kc::attention_backward(p, p, p, p, p, p, p, p, p, {.Tq = 2, .Tk = 4, .HD = 4}), error);
  EXPECT_THROW(kc::attention_forward(p, p, p, p, p, {.Tk = 4, .HD = 4, .kv_stride_b = 8}), error);
}
