// tests/unit/memo_alpha_test.cpp — MEMO's swap fraction α (parallel/memo/alpha.h): the per-layer
// swap byte counts against the swap engine's stats (dense and MoE layers, α rounded to tokens as
// the engine does), choose_alpha on hand-computed bandwidth-bound / host-bound / unbounded /
// infeasible cases, α monotone in forward time, bandwidth and host limit, and the measurements
// (finite, positive, the copy cap honoured).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "parallel/memo/alpha.h"
#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "runtime/error.h"

namespace {

namespace memo = troupe::parallel::memo;
using memo::alpha_inputs;
using memo::alpha_result;
using troupe::parallel::decoder;
using troupe::parallel::fb_options;
using troupe::parallel::model_weights;
using troupe::runtime::model_config;

constexpr int64_t B = 2, T = 64, N = B * T;

model_config dense_config() {  // memo_swap_test's GQA config: C 64, I 96, 4 layers, 4 heads, 2 kv heads
  return troupe::runtime::parse_hf_config(
      R"({"model_type":"llama","vocab_size":50,"hidden_size":64,"intermediate_size":96,
      "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":128,
      "rms_norm_eps":1e-5,"rope_theta":10000.0})",
      "memo_alpha_test");
}

// Hand formulas for dense_config at (B, T): bytes swapped whole and per split token row.
constexpr int64_t C = 64, QD = 64, KVD = 32, I = 96, NH = 4;
constexpr int64_t whole_in = 4 * N * C, whole_attn = 4 * (N * QD + B * NH * T), whole = whole_in + whole_attn;
constexpr int64_t per_token = 4 * (3 * C + 2 + QD + 2 * KVD + 3 * I);  // xn1 rstd1 q k v x_mid xn2 rstd2, mlp x3

// One forward_backward with the engine (or memo off); returns the decoder's saved() bytes per layer.
std::vector<size_t> run(const model_weights& w, int64_t b, int64_t t, memo::memo_swap* m) {
  const auto ids = model_test::random_ids(b * t, w.config().vocab_size, 11);
  const auto tg = troupe::parallel::shift_targets(ids, b, t);
  decoder dec(w);
  model_weights g = model_weights::zeros_like(w);
  fb_options o;
  o.memo = m;
  dec.forward_backward(ids.data(), tg.data(), b, t, g, o);
  std::vector<size_t> out;
  for (const auto& a : dec.saved()) out.push_back(a.bytes());
  return out;
}

// host_bytes == the engine's host_bytes (and d2h bytes) for these α and keep values.
void expect_engine_host_bytes(const model_config& c, int64_t b, int64_t t, const std::vector<double>& alphas,
                              const std::vector<int64_t>& keeps, const std::string& name) {
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  for (int64_t keep : keeps)
    for (double alpha : alphas) {
      memo::memo_swap m(memo::memo_options{alpha, keep, 0});
      run(w, b, t, &m);
      const std::string what = name + " alpha=" + std::to_string(alpha) + " keep=" + std::to_string(keep);
      EXPECT_EQ(memo::host_bytes(c, b, t, alpha, keep), static_cast<int64_t>(m.stats().host_bytes)) << what;
      EXPECT_EQ(memo::host_bytes(c, b, t, alpha, keep), static_cast<int64_t>(m.stats().d2h_bytes)) << what;
    }
}

TEST(MemoAlpha, DenseSwapBytesMatchEngine) {
  const model_config c = dense_config();
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const memo::layer_swap_bytes s = memo::swap_bytes(c, B, T, l);
    EXPECT_EQ(s.input, whole_in);
    EXPECT_EQ(s.attn, whole_attn);
    EXPECT_EQ(s.others, per_token * N);
  }
  // Everything the layer saves is counted: memo off, saved() holds exactly input + attn + others per layer.
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  for (size_t got : run(w, B, T, nullptr)) EXPECT_EQ(static_cast<int64_t>(got), whole + per_token * N);
  // 0.25390625 * 128 = 32.5 rounds to 33 (llround), as the engine does; 0.3 * 128 = 38.4 -> 38.
  EXPECT_EQ(memo::host_bytes(c, B, T, 0.25390625, 2), 2 * (whole + 33 * per_token));
  EXPECT_EQ(memo::host_bytes(c, B, T, 0.3, 0), 4 * (whole + 38 * per_token));
  expect_engine_host_bytes(c, B, T, {0.0, 0.25390625, 0.3, 1.0}, {0, 2, 3}, "dense");
}

TEST(MemoAlpha, MoeSwapBytesMatchEngine) {
  constexpr int64_t b = 2, t = 6, n = b * t;
  // qwen2_moe micro: layer 0 dense (I 10), layer 1 sparse (E 4, top-2, Im 6, shared expert Is 5); C 8, 2 heads
  // of 4, 1 kv head. mixtral micro: one sparse layer (E 4, top-2, Im 6), no shared expert.
  for (const std::string kind : {"qwen2_moe", "mixtral"}) {
    const model_config c = model_test::micro_config(kind);
    const int64_t Cm = 8, QDm = 8, KVDm = 4, E = 4, K = 2, Im = 6, R = n * K;
    const int64_t Is = kind == "qwen2_moe" ? 5 : 0, Id = 10;
    const int64_t attn_all = 4 * (n * Cm + n * QDm + b * 2 * t) + 4 * n * (3 * Cm + 2 + QDm + 2 * KVDm);
    const int64_t moe_tensors = 4 * (n * E + 2 * n * K + 2 * R * Cm + 2 * R * Im) +
                                (Is > 0 ? 4 * (3 * n * Is + n * Cm + n) : 0);
    const int64_t routing = 4 * (E + 1 + 2 * R);  // offsets, row_slot, slot_row: stay on the device
    const model_weights w = model_weights::random_init(c, 3, 0.1f);
    const std::vector<size_t> saved = run(w, b, t, nullptr);
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const memo::layer_swap_bytes s = memo::swap_bytes(c, b, t, l);
      if (c.layer_is_moe(l)) {
        EXPECT_EQ(s.input, attn_all + moe_tensors) << kind << " layer " << l;
        EXPECT_EQ(s.attn, 0);
        EXPECT_EQ(s.others, 0);
        EXPECT_EQ(static_cast<int64_t>(saved[static_cast<size_t>(l)]), s.input + routing) << kind;
      } else {
        EXPECT_EQ(s.input + s.attn + s.others, attn_all + 4 * n * 3 * Id) << kind << " layer " << l;
        EXPECT_EQ(static_cast<int64_t>(saved[static_cast<size_t>(l)]), s.input + s.attn + s.others) << kind;
      }
    }
    // 0.375 * 12 = 4.5 rounds to 5.
    expect_engine_host_bytes(c, b, t, {0.0, 0.375, 1.0}, {0, 1}, kind);
  }
}

alpha_inputs inputs(double fwd_s, double gbps, int64_t limit = 0, int64_t keep = 2) {
  alpha_inputs in;
  in.layer_forward_s = fwd_s;
  in.host_gbps = gbps;
  in.host_limit_bytes = limit;
  in.keep_last_layers = keep;
  return in;
}

bool has(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// dense_config, keep 2: layers 0 and 1 swapped, each whole + k * per_token bytes at k = α·N rows.
TEST(MemoAlpha, BandwidthBound) {
  const model_config c = dense_config();
  // The copy of whole + 32.5 rows takes exactly one layer forward at 2 GB/s: 32 rows fit, 33 do not.
  const alpha_result r = memo::choose_alpha(c, B, T, inputs((whole + 32.5 * per_token) / 2e9, 2.0));
  EXPECT_EQ(r.alpha, 0.25);
  EXPECT_TRUE(r.bandwidth_bound);
  EXPECT_FALSE(r.host_bound);
  EXPECT_TRUE(r.feasible);
  EXPECT_DOUBLE_EQ(r.copy_s_at_alpha, static_cast<double>(whole + 32 * per_token) / 2e9);
  EXPECT_EQ(r.host_bytes_at_alpha, 2 * (whole + 32 * per_token));
  EXPECT_EQ(r.host_bytes_at_alpha, memo::host_bytes(c, B, T, r.alpha, 2));
  EXPECT_TRUE(has(r.reason, "bandwidth")) << r.reason;
}

TEST(MemoAlpha, HostBound) {
  const model_config c = dense_config();
  const int64_t limit = 2 * (whole + 96 * per_token) + per_token / 2;  // 96 rows fit, 97 do not
  const alpha_result r = memo::choose_alpha(c, B, T, inputs(1.0, 10.0, limit));
  EXPECT_EQ(r.alpha, 0.75);
  EXPECT_FALSE(r.bandwidth_bound);
  EXPECT_TRUE(r.host_bound);
  EXPECT_TRUE(r.feasible);
  EXPECT_EQ(r.host_bytes_at_alpha, 2 * (whole + 96 * per_token));
  EXPECT_DOUBLE_EQ(r.copy_s_at_alpha, static_cast<double>(whole + 96 * per_token) / 10e9);
  EXPECT_TRUE(has(r.reason, "host memory")) << r.reason;
  // Both bounds below 1: the tighter one decides (bandwidth 64 rows, host 40), both flags set.
  const alpha_result b =
      memo::choose_alpha(c, B, T, inputs((whole + 64.5 * per_token) / 2e9, 2.0, 2 * (whole + 40 * per_token)));
  EXPECT_EQ(b.alpha, 40.0 / 128);
  EXPECT_TRUE(b.bandwidth_bound);
  EXPECT_TRUE(b.host_bound);
  EXPECT_TRUE(has(b.reason, "host memory")) << b.reason;
  // Three layers with keep 2: only layer 0 is swapped, the host limit holds one layer.
  alpha_inputs in = inputs(1.0, 10.0, whole + 10 * per_token);
  in.n_layers = 3;
  EXPECT_EQ(memo::choose_alpha(c, B, T, in).alpha, 10.0 / 128);
}

TEST(MemoAlpha, UnboundedIsOne) {
  const model_config c = dense_config();
  const alpha_result r = memo::choose_alpha(c, B, T, inputs(1.0, 10.0, 0));
  EXPECT_EQ(r.alpha, 1.0);
  EXPECT_FALSE(r.bandwidth_bound);
  EXPECT_FALSE(r.host_bound);
  EXPECT_TRUE(r.feasible);
  EXPECT_EQ(r.host_bytes_at_alpha, 2 * (whole + N * per_token));
  EXPECT_DOUBLE_EQ(r.copy_s_at_alpha, static_cast<double>(whole + N * per_token) / 10e9);
  // Exactly enough host memory and time for everything; infinite bandwidth.
  EXPECT_EQ(memo::choose_alpha(c, B, T, inputs((whole + N * per_token) / 10e9, 10.0, 2 * (whole + N * per_token)))
                .alpha,
            1.0);
  EXPECT_EQ(memo::choose_alpha(c, B, T, inputs(0.0, std::numeric_limits<double>::infinity())).alpha, 1.0);
  // keep >= L: nothing swapped, nothing bounds.
  const alpha_result none = memo::choose_alpha(c, B, T, inputs(0.0, 1.0, 1, 4));
  EXPECT_EQ(none.alpha, 1.0);
  EXPECT_TRUE(none.feasible);
  EXPECT_EQ(none.host_bytes_at_alpha, 0);
}

TEST(MemoAlpha, InfeasibleAtZero) {
  const model_config c = dense_config();
  // x_in + att + lse alone take longer to copy than a layer forward.
  const alpha_result bw = memo::choose_alpha(c, B, T, inputs(0.9 * whole / 2e9, 2.0));
  EXPECT_EQ(bw.alpha, 0.0);
  EXPECT_FALSE(bw.feasible);
  EXPECT_TRUE(bw.bandwidth_bound);
  EXPECT_FALSE(bw.host_bound);
  EXPECT_EQ(bw.host_bytes_at_alpha, 2 * whole);
  EXPECT_TRUE(has(bw.reason, "bandwidth")) << bw.reason;
  EXPECT_FALSE(has(bw.reason, "host memory")) << bw.reason;
  // Two layers' whole tensors do not fit in host memory.
  const alpha_result host = memo::choose_alpha(c, B, T, inputs(1.0, 10.0, 2 * whole - 1));
  EXPECT_EQ(host.alpha, 0.0);
  EXPECT_FALSE(host.feasible);
  EXPECT_FALSE(host.bandwidth_bound);
  EXPECT_TRUE(host.host_bound);
  EXPECT_TRUE(has(host.reason, "host memory")) << host.reason;
  EXPECT_FALSE(has(host.reason, "bandwidth")) << host.reason;
  const alpha_result both = memo::choose_alpha(c, B, T, inputs(0.0, 10.0, 1));
  EXPECT_FALSE(both.feasible);
  EXPECT_TRUE(both.bandwidth_bound && both.host_bound);
  EXPECT_TRUE(has(both.reason, "bandwidth") && has(both.reason, "host memory")) << both.reason;
  // Exactly α = 0 fitting is feasible.
  const alpha_result edge = memo::choose_alpha(c, B, T, inputs(1.0, 10.0, 2 * whole));
  EXPECT_EQ(edge.alpha, 0.0);
  EXPECT_TRUE(edge.feasible);
}

// qwen2_moe micro: layer 1 (MoE) is copied whole; the bandwidth bound is checked on the worst layer.
TEST(MemoAlpha, MoeWholeLayerAndWorstLayer) {
  constexpr int64_t b = 2, t = 6, n = b * t;
  const model_config c = model_test::micro_config("qwen2_moe");
  const memo::layer_swap_bytes d = memo::swap_bytes(c, b, t, 0), m = memo::swap_bytes(c, b, t, 1);
  ASSERT_GT(m.input, d.input + d.attn);
  const int64_t row = d.others / n;
  // Forward time = the MoE layer's copy: the dense layer gets the rows that fit in the same time.
  const int64_t k = std::min<int64_t>(n, (m.input - d.input - d.attn) / row);
  const alpha_result r = memo::choose_alpha(c, b, t, inputs(m.input / 1e9, 1.0, 0, 0));
  EXPECT_TRUE(r.feasible);
  EXPECT_EQ(r.alpha, static_cast<double>(k) / n);
  EXPECT_DOUBLE_EQ(r.copy_s_at_alpha, m.input / 1e9);
  EXPECT_EQ(r.host_bytes_at_alpha, memo::host_bytes(c, b, t, r.alpha, 0));
  // A shorter forward than the MoE layer's whole copy: infeasible at α = 0 whatever the dense layer does.
  const alpha_result bad = memo::choose_alpha(c, b, t, inputs(0.99 * m.input / 1e9, 1.0, 0, 0));
  EXPECT_FALSE(bad.feasible);
  EXPECT_TRUE(has(bad.reason, "bandwidth")) << bad.reason;
  // mixtral micro: every layer MoE, others = 0: α = 1 if the whole layer fits, else infeasible.
  const model_config mx = model_test::micro_config("mixtral");
  const int64_t mw = memo::swap_bytes(mx, b, t, 0).input;
  EXPECT_EQ(memo::choose_alpha(mx, b, t, inputs(1.0, 10.0, mw, 0)).alpha, 1.0);
  EXPECT_FALSE(memo::choose_alpha(mx, b, t, inputs(1.0, 10.0, mw - 1, 0)).feasible);
}

TEST(MemoAlpha, MonotoneInForwardTimeBandwidthAndHostLimit) {
  const model_config c = dense_config();
  const double full_s = static_cast<double>(whole + N * per_token) / 1e9;  // at 1 GB/s
  double prev = -1;
  for (int i = 0; i <= 60; ++i) {  // forward time 0 .. 1.2x the full copy at 1 GB/s
    const double a = memo::choose_alpha(c, B, T, inputs(full_s * i / 50.0, 1.0)).alpha;
    EXPECT_GE(a, prev) << "forward step " << i;
    prev = a;
  }
  EXPECT_EQ(prev, 1.0);
  EXPECT_EQ(memo::choose_alpha(c, B, T, inputs(0.0, 1.0)).alpha, 0.0);
  prev = -1;
  for (int i = 1; i <= 60; ++i) {  // bandwidth 0.02 .. 1.2 GB/s at forward time full_s
    const double a = memo::choose_alpha(c, B, T, inputs(full_s, i / 50.0)).alpha;
    EXPECT_GE(a, prev) << "bandwidth step " << i;
    prev = a;
  }
  EXPECT_EQ(prev, 1.0);
  prev = -1;
  for (int i = 1; i <= 60; ++i) {  // host limit up to 1.2x two full layers
    const int64_t limit = 2 * (whole + N * per_token) * i / 50;
    const double a = memo::choose_alpha(c, B, T, inputs(1.0, 10.0, limit)).alpha;
    EXPECT_GE(a, prev) << "host step " << i;
    prev = a;
  }
  EXPECT_EQ(prev, 1.0);
  // Strictly between: half the rows' worth of time gives α near 0.5.
  const double mid = memo::choose_alpha(c, B, T, inputs((whole + 0.5 * N * per_token) / 1e9, 1.0)).alpha;
  EXPECT_GT(mid, 0.45);
  EXPECT_LT(mid, 0.55);
}

TEST(MemoAlpha, RejectsBadInputs) {
  const model_config c = dense_config();
  EXPECT_THROW(memo::choose_alpha(c, B, T, inputs(1.0, 0.0)), troupe::runtime::error);
  EXPECT_THROW(memo::choose_alpha(c, B, T, inputs(-1.0, 1.0)), troupe::runtime::error);
  EXPECT_THROW(memo::choose_alpha(c, B, T, inputs(std::nan(""), 1.0)), troupe::runtime::error);
  EXPECT_THROW(memo::choose_alpha(c, B, T, inputs(1.0, 1.0, -1)), troupe::runtime::error);
  EXPECT_THROW(memo::choose_alpha(c, B, T, inputs(1.0, 1.0, 0, -1)), troupe::runtime::error);
  EXPECT_THROW(memo::choose_alpha(c, 0, T, inputs(1.0, 1.0)), troupe::runtime::error);
  EXPECT_THROW(memo::host_bytes(c, B, T, 1.5, 2), troupe::runtime::error);
  EXPECT_THROW(memo::measure_copy_gbps(0), troupe::runtime::error);
  EXPECT_THROW(memo::measure_copy_gbps(1024, -1.0), troupe::runtime::error);
}

TEST(MemoAlpha, Measurements) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  const double fwd = memo::measure_layer_forward_s(w, B, T);
  EXPECT_TRUE(std::isfinite(fwd));
  EXPECT_GT(fwd, 0.0);
  const size_t bytes = size_t{16} << 20;
  const double free_gbps = memo::measure_copy_gbps(bytes);
  EXPECT_TRUE(std::isfinite(free_gbps));
  EXPECT_GT(free_gbps, 0.0);
  const double capped = memo::measure_copy_gbps(bytes, 2.0);
  EXPECT_GT(capped, 0.0);
  EXPECT_LE(capped, 2.0 * 1.05);
  // Fed back: a feasible α in [0, 1] on this machine's numbers.
  const alpha_result r = memo::choose_alpha(c, B, T, inputs(fwd, free_gbps));
  EXPECT_GE(r.alpha, 0.0);
  EXPECT_LE(r.alpha, 1.0);
  std::printf("layer forward %.3g s, copy %.3g GB/s (capped at 2: %.3g): alpha %.4f; %s\n", fwd, free_gbps, capped,
              r.alpha, r.reason.c_str());
}

}  // namespace
