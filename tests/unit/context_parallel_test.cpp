// tests/unit/context_parallel_test.cpp — context parallelism and the decoder's trainer hooks:
//   * the CPU attention kernel's q_offset (forward vs a naive reference; a sequence cut in
//     key/query blocks, merged by log-sum-exp, vs naive full attention, forward and backward,
//     with and without a sliding window — including blocks a window hides entirely);
//   * the decoder under Ulysses and ring CP over an in-process group (P threads): the sum of the
//     ranks' losses and of their gradients equals the single-rank loss and gradient (GQA, biases,
//     tied embeddings + window);
//   * fb_options: loss_denominator scaling and grads_ready's order and finality.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dense_test_util.h"
#include "kernels/attention.h"
#include "model_test_util.h"
#include "parallel/cp/context_parallel.h"
#include "parallel/model/decoder.h"
#include "runtime/communicator.h"
#include "runtime/error.h"

namespace {

using namespace troupe;
namespace kc = troupe::kernels::cpu;
using dense_test::randn;
using kernels::attention_dims;
using parallel::context_parallel;
using parallel::cp_mode;
using parallel::decoder;
using parallel::fb_options;
using parallel::model_weights;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ---- kernel: q_offset -----------------------------------------------------------------------

struct ref_attn {
  std::vector<double> out, lse, dq, dk, dv;
};

// Naive GQA attention in double: query row i at position off + i, key j at j (< Tk), visible
// when j <= pos and (window == 0 or j > pos - window). Rows that see nothing: out 0, lse -inf.
// With dout: the exact gradient (dk, dv dense (B, Tk, NKV, HD)).
ref_attn naive(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
               const attention_dims& d, int64_t off, const std::vector<float>* dout = nullptr) {
  const int64_t B = d.B, Tq = d.Tq, Tk = d.Tk, NH = d.NH, NKV = d.NKV, HD = d.HD;
  const double sc = 1.0 / std::sqrt(double(HD));
  ref_attn r;
  r.out.assign(B * Tq * NH * HD, 0.0);
  r.lse.assign(B * NH * Tq, kNegInf);
  if (dout) r.dq.assign(q.size(), 0.0), r.dk.assign(B * Tk * NKV * HD, 0.0), r.dv.assign(r.dk.size(), 0.0);
  std::vector<double> p(Tk), dp(Tk);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t kh = h / (NH / NKV);
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t pos = off + i;
        const int64_t lo = d.window > 0 ? std::max<int64_t>(0, pos - d.window + 1) : 0;
        const int64_t hi = std::min(pos, Tk - 1);
        if (lo > hi) continue;
        const float* qi = q.data() + ((b * Tq + i) * NH + h) * HD;
        auto kv = [&](const std::vector<float>& t, int64_t j) { return t.data() + ((b * Tk + j) * NKV + kh) * HD; };
        double mx = -1e300;
        for (int64_t j = lo; j <= hi; ++j) {
          double s = 0;
          for (int64_t x = 0; x < HD; ++x) s += double(qi[x]) * kv(k, j)[x];
          p[j] = s * sc;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int64_t j = lo; j <= hi; ++j) sum += std::exp(p[j] - mx);
        for (int64_t j = lo; j <= hi; ++j) p[j] = std::exp(p[j] - mx) / sum;
        r.lse[(b * NH + h) * Tq + i] = mx + std::log(sum);
        double* oi = r.out.data() + ((b * Tq + i) * NH + h) * HD;
        for (int64_t j = lo; j <= hi; ++j)
          for (int64_t x = 0; x < HD; ++x) oi[x] += p[j] * kv(v, j)[x];
        if (!dout) continue;
        const float* gi = dout->data() + ((b * Tq + i) * NH + h) * HD;
        double dsum = 0;
        for (int64_t j = lo; j <= hi; ++j) {
          dp[j] = 0;
          for (int64_t x = 0; x < HD; ++x) {
            dp[j] += gi[x] * double(kv(v, j)[x]);
            r.dv[((b * Tk + j) * NKV + kh) * HD + x] += p[j] * gi[x];
          }
          dsum += p[j] * dp[j];
        }
        for (int64_t j = lo; j <= hi; ++j) {
          const double ds = p[j] * (dp[j] - dsum) * sc;
          for (int64_t x = 0; x < HD; ++x) {
            r.dq[((b * Tq + i) * NH + h) * HD + x] += ds * kv(k, j)[x];
            r.dk[((b * Tk + j) * NKV + kh) * HD + x] += ds * qi[x];
          }
        }
      }
    }
  return r;
}

// max |a - b| over finite entries / max |b|; an entry infinite in one and not both counts as 1e30.
double rel_err_inf(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0.0, den = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    if (std::isinf(b[i]) || std::isinf(a[i])) {
      if (!(std::isinf(b[i]) && std::isinf(a[i]) && (b[i] < 0) == (a[i] < 0))) num = 1e30;
      continue;
    }
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}

void check_offset_forward(const attention_dims& d, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "Tq " << d.Tq << " Tk " << d.Tk << " q_offset " << d.q_offset << " window "
                                  << d.window);
  const auto q = randn(d.B * d.Tq * d.NH * d.HD, seed, 1.5f);
  const auto k = randn(d.B * d.Tk * d.NKV * d.HD, seed + 1, 1.5f);
  const auto v = randn(k.size(), seed + 2);
  std::vector<float> out(q.size(), 7.0f), lse(d.B * d.NH * d.Tq, 7.0f);
  kc::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), d);
  const ref_attn r = naive(q, k, v, d, d.q_offset);
  EXPECT_LT(rel_err_inf(out, r.out), 1e-5);
  EXPECT_LT(rel_err_inf(lse, r.lse), 1e-5);
}

// (B, nb*Tb, H, HD) <-> block r (B, Tb, H, HD)
std::vector<float> block_of(const std::vector<float>& full, int64_t B, int64_t nb, int64_t Tb, int64_t H,
                            int64_t HD, int64_t r) {
  std::vector<float> o(B * Tb * H * HD);
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(full.begin() + ((b * nb + r) * Tb) * H * HD, Tb * H * HD, o.begin() + b * Tb * H * HD);
  return o;
}
void add_block(std::vector<float>& full, const std::vector<float>& blk, int64_t B, int64_t nb, int64_t Tb, int64_t H,
               int64_t HD, int64_t r) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t x = 0; x < Tb * H * HD; ++x) full[((b * nb + r) * Tb) * H * HD + x] += blk[b * Tb * H * HD + x];
}

// A sequence of nb*Tb tokens in blocks of Tb: every (query block r, key block j <= r) pair goes
// through the kernel with q_offset = (r - j) * Tb; forward merged by log-sum-exp, backward with
// the merged out/lse summed per block. Must equal naive attention over the whole sequence.
void check_block_decomposition(int64_t B, int64_t nb, int64_t Tb, int64_t NH, int64_t NKV, int64_t HD,
                               int64_t window, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "blocks " << nb << " x " << Tb << " window " << window);
  const int64_t Tf = nb * Tb;
  const attention_dims full{.B = B, .Tq = Tf, .Tk = Tf, .NH = NH, .NKV = NKV, .HD = HD, .window = window};
  const auto q = randn(B * Tf * NH * HD, seed, 1.5f);
  const auto k = randn(B * Tf * NKV * HD, seed + 1, 1.5f);
  const auto v = randn(k.size(), seed + 2);
  const auto dout = randn(q.size(), seed + 3);
  const ref_attn ref = naive(q, k, v, full, 0, &dout);

  attention_dims blk{.B = B, .Tq = Tb, .Tk = Tb, .NH = NH, .NKV = NKV, .HD = HD, .window = window};
  std::vector<float> out(q.size(), 0.0f), lse(B * NH * Tf), dq(q.size(), 0.0f), dk(k.size(), 0.0f),
      dv(k.size(), 0.0f);
  std::vector<std::vector<float>> out_r(nb), lse_r(nb);
  int empty_rows = 0;
  for (int64_t r = 0; r < nb; ++r) {
    const auto qr = block_of(q, B, nb, Tb, NH, HD, r);
    std::vector<double> o(qr.size(), 0.0), l(B * NH * Tb, kNegInf);
    for (int64_t j = 0; j <= r; ++j) {  // every block, also those a window hides entirely
      const auto kj = block_of(k, B, nb, Tb, NKV, HD, j), vj = block_of(v, B, nb, Tb, NKV, HD, j);
      blk.q_offset = (r - j) * Tb;
      std::vector<float> oj(qr.size()), lj(l.size());
      kc::attention_forward(oj.data(), lj.data(), qr.data(), kj.data(), vj.data(), blk);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < NH; ++h)
          for (int64_t t = 0; t < Tb; ++t) {
            const int64_t li = (b * NH + h) * Tb + t;
            if (std::isinf(lj[li])) {
              ++empty_rows;
              continue;
            }
            const double m = std::max<double>(l[li], lj[li]);
            const double ln = m + std::log(std::exp(l[li] - m) + std::exp(lj[li] - m));
            for (int64_t x = 0; x < HD; ++x) {
              double& ox = o[((b * Tb + t) * NH + h) * HD + x];
              ox = ox * std::exp(l[li] - ln) + oj[((b * Tb + t) * NH + h) * HD + x] * std::exp(lj[li] - ln);
            }
            l[li] = ln;
          }
    }
    out_r[r].assign(o.begin(), o.end());
    lse_r[r].assign(l.begin(), l.end());
    add_block(out, out_r[r], B, nb, Tb, NH, HD, r);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t t = 0; t < Tb; ++t) lse[(b * NH + h) * Tf + r * Tb + t] = lse_r[r][(b * NH + h) * Tb + t];
  }
  if (window > 0) {
    EXPECT_GT(empty_rows, 0) << "the window case should hide some rows of some blocks";
  }
  EXPECT_LT(rel_err_inf(out, ref.out), 1e-5);
  EXPECT_LT(rel_err_inf(lse, ref.lse), 1e-5);

  for (int64_t r = 0; r < nb; ++r) {
    const auto qr = block_of(q, B, nb, Tb, NH, HD, r), dor = block_of(dout, B, nb, Tb, NH, HD, r);
    for (int64_t j = 0; j <= r; ++j) {
      const auto kj = block_of(k, B, nb, Tb, NKV, HD, j), vj = block_of(v, B, nb, Tb, NKV, HD, j);
      blk.q_offset = (r - j) * Tb;
      std::vector<float> dqj(qr.size()), dkj(kj.size()), dvj(kj.size());
      kc::attention_backward(dqj.data(), dkj.data(), dvj.data(), dor.data(), qr.data(), kj.data(), vj.data(),
                             out_r[r].data(), lse_r[r].data(), blk);
      add_block(dq, dqj, B, nb, Tb, NH, HD, r);
      add_block(dk, dkj, B, nb, Tb, NKV, HD, j);
      add_block(dv, dvj, B, nb, Tb, NKV, HD, j);
    }
  }
  EXPECT_LT(rel_err_inf(dq, ref.dq), 1e-5);
  EXPECT_LT(rel_err_inf(dk, ref.dk), 1e-5);
  EXPECT_LT(rel_err_inf(dv, ref.dv), 1e-5);
}

TEST(attention_q_offset, forward_matches_naive) {
  // Queries after all keys (every key visible), Tq != Tk, across tiles.
  check_offset_forward({.B = 2, .Tq = 5, .Tk = 70, .NH = 4, .NKV = 2, .HD = 8, .q_offset = 80}, 1);
  check_offset_forward({.B = 1, .Tq = 130, .Tk = 70, .NH = 2, .NKV = 1, .HD = 16, .q_offset = 70}, 4);
  // q_offset 0, Tq > Tk: the first Tk rows are causal, the rest see every key.
  check_offset_forward({.B = 1, .Tq = 100, .Tk = 67, .NH = 2, .NKV = 2, .HD = 8, .q_offset = 0}, 7);
  // A window: rows 9.. see no key (out 0, lse -inf).
  check_offset_forward({.B = 1, .Tq = 20, .Tk = 70, .NH = 2, .NKV = 1, .HD = 8, .window = 30, .q_offset = 90}, 10);
  // The explicit default equals the implicit one.
  check_offset_forward({.B = 1, .Tq = 9, .Tk = 70, .NH = 2, .NKV = 1, .HD = 8, .q_offset = 61}, 13);
}

TEST(attention_q_offset, blocks_merged_by_lse_equal_full_attention_forward_and_backward) {
  check_block_decomposition(/*B=*/2, /*nb=*/3, /*Tb=*/70, /*NH=*/4, /*NKV=*/2, /*HD=*/8, /*window=*/0, 21);
  check_block_decomposition(1, 4, 16, 2, 1, 16, /*window=*/20, 31);
  check_block_decomposition(1, 3, 70, 2, 2, 8, /*window=*/50, 41);
}

TEST(attention_q_offset, bad_offsets_are_rejected) {
  float p[64] = {};
  EXPECT_THROW(kc::attention_forward(p, p, p, p, p, {.Tq = 2, .Tk = 2, .HD = 4, .q_offset = -2}), runtime::error);
  // Tq > Tk needs an explicit q_offset, in forward and backward.
  EXPECT_THROW(kc::attention_forward(p, p, p, p, p, {.Tq = 3, .Tk = 2, .HD = 4}), runtime::error);
  EXPECT_THROW(kc::attention_backward(p, p, p, p, p, p, p, p, p, {.Tq = 2, .Tk = 3, .HD = 4}), runtime::error);
}

// ---- decoder under context parallelism -----------------------------------------------------

runtime::model_config cp_config(int64_t n_kv_heads, bool tied_window) {
  std::string j = R"({"model_type":")" + std::string(tied_window ? "mistral" : "llama") +
                  R"(","vocab_size":64,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
      "num_attention_heads":4,"num_key_value_heads":)" +
                  std::to_string(n_kv_heads) + R"(,"head_dim":16,"rms_norm_eps":1e-5,"rope_theta":10000.0,
      "max_position_embeddings":64)";
  if (tied_window)
    j += R"(,"sliding_window":6,"tie_word_embeddings":true})";
  else
    j += R"(,"attention_bias":true})";
  return runtime::parse_hf_config(j, "cp_test");
}

model_weights make_weights(const runtime::model_config& c) {
  model_weights w = model_weights::random_init(c, /*seed=*/3, /*std=*/0.1f);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  for (auto& p : w.parameters())
    if (p.value.ndim() == 1 && p.name.find("norm") == std::string::npos)  // non-zero biases
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = nd(rng);
  return w;
}

struct problem {
  int64_t B = 2, T = 32;  // T: the whole sequence
  std::vector<int32_t> ids, targets;
  double n_valid = 0;
};

problem make_problem(const runtime::model_config& c) {
  problem p;
  p.ids = model_test::random_ids(p.B * p.T, c.vocab_size, 5);
  p.targets = parallel::shift_targets(p.ids, p.B, p.T);
  p.targets[3] = -1;   // an ignored target in the middle of rank 0's chunk
  p.targets[45] = -1;  // and one later on
  for (auto t : p.targets) p.n_valid += t >= 0 ? 1 : 0;
  return p;
}

// Rank r's chunk (B, T/P) of a (B, T) array.
std::vector<int32_t> chunk(const std::vector<int32_t>& a, int64_t B, int64_t T, int P, int r) {
  const int64_t Tl = T / P;
  std::vector<int32_t> o(B * Tl);
  for (int64_t b = 0; b < B; ++b) std::copy_n(a.begin() + b * T + r * Tl, Tl, o.begin() + b * Tl);
  return o;
}

struct cp_run {
  double loss = 0;  // summed over ranks
  std::vector<double> loss_fwd;
  model_weights grads;  // summed over ranks
};

// Runs forward_backward (and forward_loss) on P threads, one CP rank each.
cp_run run_cp(const model_weights& w, const problem& pb, int P, cp_mode mode) {
  auto group = runtime::make_inproc_group(P, 20000);
  std::vector<model_weights> g;
  for (int r = 0; r < P; ++r) g.push_back(model_weights::zeros_like(w));
  std::vector<double> loss(P), loss_fwd(P);
  std::vector<std::exception_ptr> err(P);
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      try {
        decoder dec(w);
        const context_parallel cp{.comm = group[r].get(), .mode = mode};
        dec.set_context_parallel(&cp);
        const auto ids = chunk(pb.ids, pb.B, pb.T, P, r), tg = chunk(pb.targets, pb.B, pb.T, P, r);
        const fb_options opt{.loss_denominator = pb.n_valid};
        loss[r] = dec.forward_backward(ids.data(), tg.data(), pb.B, pb.T / P, g[r], opt);
        loss_fwd[r] = dec.forward_loss(ids.data(), tg.data(), pb.B, pb.T / P, opt);
      } catch (...) {
        err[r] = std::current_exception();
        group[r]->abort("rank failed");
      }
    });
  for (auto& t : th) t.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
  cp_run out;
  out.grads = model_weights::zeros_like(w);
  for (int r = 0; r < P; ++r) {
    out.loss += loss[r];
    auto dst = out.grads.parameters();
    auto src = g[r].parameters();
    for (size_t i = 0; i < dst.size(); ++i)
      for (int64_t x = 0; x < dst[i].value.numel(); ++x) dst[i].value.data<float>()[x] += src[i].value.data<float>()[x];
  }
  double fwd = 0;
  for (double l : loss_fwd) fwd += l;
  out.loss_fwd = {fwd};
  return out;
}

void check_cp_matches_single_rank(const runtime::model_config& c, int P, cp_mode mode) {
  SCOPED_TRACE(testing::Message() << "cp " << P << " " << parallel::cp_mode_name(mode) << " NKV " << c.n_kv_heads
                                  << " window " << c.sliding_window);
  const model_weights w = make_weights(c);
  const problem pb = make_problem(c);
  decoder ref(w);
  model_weights gref = model_weights::zeros_like(w);
  const double lref = ref.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, gref,
                                           fb_options{.loss_denominator = pb.n_valid});
  cp_run got = run_cp(w, pb, P, mode);
  EXPECT_NEAR(got.loss, lref, 1e-5 * std::abs(lref));
  EXPECT_NEAR(got.loss_fwd[0], lref, 1e-5 * std::abs(lref));
  auto a = got.grads.parameters();
  auto b = gref.parameters();
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = model_test::rel_err(a[i].value.data<float>(), b[i].value.data<float>(), b[i].value.numel());
    EXPECT_LT(e, 1e-5) << a[i].name;
    worst = std::max(worst, e);
  }
  std::printf("[ cp=%d %-7s NKV=%lld window=%lld ] loss %.7f vs %.7f (rel %.2e), worst grad rel err %.2e\n", P,
              parallel::cp_mode_name(mode), static_cast<long long>(c.n_kv_heads),
              static_cast<long long>(c.sliding_window), got.loss, lref, std::abs(got.loss - lref) / lref, worst);
}

TEST(context_parallel, ulysses_matches_single_rank) {
  check_cp_matches_single_rank(cp_config(2, false), 2, cp_mode::ulysses);
  check_cp_matches_single_rank(cp_config(4, false), 4, cp_mode::ulysses);
  check_cp_matches_single_rank(cp_config(4, true), 4, cp_mode::ulysses);  // tied + sliding window
}

TEST(context_parallel, ring_matches_single_rank) {
  check_cp_matches_single_rank(cp_config(2, false), 2, cp_mode::ring);
  check_cp_matches_single_rank(cp_config(2, false), 4, cp_mode::ring);  // ring needs no head divisibility
  check_cp_matches_single_rank(cp_config(2, true), 4, cp_mode::ring);   // window hides chunk r-2
}

TEST(context_parallel, one_rank_equals_no_cp) {
  const auto c = cp_config(2, false);
  const model_weights w = make_weights(c);
  const problem pb = make_problem(c);
  decoder ref(w);
  model_weights gref = model_weights::zeros_like(w);
  const float lref = ref.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, gref);
  for (cp_mode mode : {cp_mode::ulysses, cp_mode::ring}) {
    auto group = runtime::make_inproc_group(1);
    decoder dec(w);
    const context_parallel cp{.comm = group[0].get(), .mode = mode};
    dec.set_context_parallel(&cp);
    model_weights g = model_weights::zeros_like(w);
    EXPECT_EQ(dec.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, g), lref);
    auto a = g.parameters();
    auto b = gref.parameters();
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(model_test::rel_err(a[i].value.data<float>(), b[i].value.data<float>(), b[i].value.numel()), 0.0)
          << a[i].name;
  }
}

TEST(context_parallel, misuse_is_rejected_clearly) {
  const auto c = cp_config(2, false);
  const model_weights w = make_weights(c);
  decoder dec(w);
  auto group = runtime::make_inproc_group(4);
  const context_parallel uly{.comm = group[0].get(), .mode = cp_mode::ulysses};
  try {
    dec.set_context_parallel(&uly);  // 2 kv heads over 4 ranks
    FAIL() << "expected an error";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::invalid_argument);
    const std::string m = e.what();
    EXPECT_NE(m.find("num kv heads 2"), std::string::npos) << m;
    EXPECT_NE(m.find("4"), std::string::npos) << m;
  }
  EXPECT_EQ(dec.context_parallelism(), nullptr);  // a rejected setting leaves the decoder as it was
  const context_parallel none{};
  EXPECT_THROW(dec.set_context_parallel(&none), runtime::error);
  // Decoding with a KV cache is not a CP path.
  auto one = runtime::make_inproc_group(1);
  const context_parallel cp1{.comm = one[0].get(), .mode = cp_mode::ring};
  dec.set_context_parallel(&cp1);
  parallel::kv_cache cache(c, 1, 8);
  const std::vector<int32_t> ids = {1, 2};
  try {
    dec.forward_cached(ids.data(), 1, 2, cache);
    FAIL() << "expected an error";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::unsupported);
  }
}

// ---- fb_options ---------------------------------------------------------------------------------

TEST(fb_options, loss_denominator_scales_loss_and_gradient) {
  const auto c = cp_config(2, false);
  const model_weights w = make_weights(c);
  const problem pb = make_problem(c);
  decoder dec(w);
  model_weights g1 = model_weights::zeros_like(w), g2 = model_weights::zeros_like(w);
  const double l1 = dec.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, g1);
  const double D = 1000.0;
  const double l2 = dec.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, g2, {.loss_denominator = D});
  const double f = pb.n_valid / D;
  EXPECT_NEAR(l2, l1 * f, 1e-6 * l1 * f);
  EXPECT_NEAR(dec.forward_loss(pb.ids.data(), pb.targets.data(), pb.B, pb.T, {.loss_denominator = D}), l2,
              1e-6 * l2);
  auto a = g2.parameters();
  auto b = g1.parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    std::vector<float> scaled(b[i].value.data<float>(), b[i].value.data<float>() + b[i].value.numel());
    for (auto& x : scaled) x = static_cast<float>(x * f);
    EXPECT_LT(model_test::rel_err(a[i].value.data<float>(), scaled.data(), b[i].value.numel()), 1e-5) << a[i].name;
  }
  EXPECT_THROW(dec.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, g2, {.loss_denominator = -1}),
               runtime::error);
}

void check_grads_ready(const runtime::model_config& c, bool no_valid_targets) {
  SCOPED_TRACE(testing::Message() << "tied " << c.tie_word_embeddings << " no_valid_targets " << no_valid_targets);
  const model_weights w = make_weights(c);
  problem pb = make_problem(c);
  if (no_valid_targets) std::fill(pb.targets.begin(), pb.targets.end(), -1);
  decoder dec(w);
  model_weights g = model_weights::zeros_like(w);
  std::vector<int64_t> order;
  std::vector<std::vector<std::vector<float>>> snap;  // per call: copies of the group's tensors
  fb_options opt;
  opt.grads_ready = [&](int64_t group) {
    order.push_back(group);
    std::vector<std::vector<float>> s;
    for (const auto& t : parallel::grad_group_tensors(g, group))
      s.emplace_back(t.data<float>(), t.data<float>() + t.numel());
    snap.push_back(std::move(s));
  };
  dec.forward_backward(pb.ids.data(), pb.targets.data(), pb.B, pb.T, g, opt);
  std::vector<int64_t> want = {parallel::grad_group::head};
  for (int64_t l = c.n_layers - 1; l >= 0; --l) want.push_back(l);
  want.push_back(parallel::grad_group::embedding);
  EXPECT_EQ(order, want);
  // The snapshot taken in the callback is bitwise the final gradient.
  size_t n_tensors = 0;
  for (size_t i = 0; i < order.size() && i < snap.size(); ++i) {
    const auto final_t = parallel::grad_group_tensors(g, order[i]);
    ASSERT_EQ(final_t.size(), snap[i].size());
    n_tensors += final_t.size();
    for (size_t t = 0; t < final_t.size(); ++t) {
      const std::vector<float> now(final_t[t].data<float>(), final_t[t].data<float>() + final_t[t].numel());
      EXPECT_EQ(now, snap[i][t]) << "group " << order[i] << " tensor " << t << " changed after grads_ready";
      if (!no_valid_targets) {
        double mx = 0;
        for (float x : now) mx = std::max(mx, double(std::fabs(x)));
        EXPECT_GT(mx, 0.0) << "group " << order[i] << " tensor " << t << " got no gradient";
      }
    }
  }
  EXPECT_EQ(n_tensors, g.parameters().size());  // the groups cover every parameter once
}

TEST(fb_options, grads_ready_reports_head_layers_backwards_then_embedding_each_final) {
  check_grads_ready(cp_config(2, false), false);  // untied: lm_head in the head group
  check_grads_ready(cp_config(2, true), false);   // tied: lm_head's gradient is the embedding's
  check_grads_ready(cp_config(2, false), true);   // nothing to learn: still every group, in order
}

TEST(fb_options, grads_ready_under_ring_cp_is_in_order_on_every_rank) {
  const auto c = cp_config(2, false);
  const model_weights w = make_weights(c);
  const problem pb = make_problem(c);
  const int P = 2;
  auto group = runtime::make_inproc_group(P, 20000);
  std::vector<std::vector<int64_t>> order(P);
  std::vector<std::exception_ptr> err(P);
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      try {
        decoder dec(w);
        const context_parallel cp{.comm = group[r].get(), .mode = cp_mode::ring};
        dec.set_context_parallel(&cp);
        model_weights g = model_weights::zeros_like(w);
        auto ids = chunk(pb.ids, pb.B, pb.T, P, r), tg = chunk(pb.targets, pb.B, pb.T, P, r);
        if (r == 1) std::fill(tg.begin(), tg.end(), -1);  // a rank without targets still takes part
        fb_options opt{.loss_denominator = pb.n_valid};
        opt.grads_ready = [&](int64_t grp) { order[r].push_back(grp); };
        dec.forward_backward(ids.data(), tg.data(), pb.B, pb.T / P, g, opt);
      } catch (...) {
        err[r] = std::current_exception();
        group[r]->abort("rank failed");
      }
    });
  for (auto& t : th) t.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
  const std::vector<int64_t> want = {parallel::grad_group::head, 1, 0, parallel::grad_group::embedding};
  for (int r = 0; r < P; ++r) EXPECT_EQ(order[r], want) << "rank " << r;
}

}  // namespace
