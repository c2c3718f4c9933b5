// tests/unit/memo_swap_test.cpp — MEMO swapping + token-wise recomputation (parallel/memo/swap.h):
// loss and every parameter gradient bitwise equal to the same step with memo off, for
// α in {0, 0.25, 0.3, 0.5, 1} and keep_last_layers in {0, 2}, on dense configs (GQA; attention
// biases; tied embeddings) and a MoE config (swapped whole); the device/host byte counts and
// the recomputed row counts (only the dropped rows' sgemm blocks) against their formulas. The
// full-recompute baseline (memo_options::full_recompute: only x_in kept, the layer's forward rerun
// before its backward) is bitwise too, dense, MoE and under ring context parallelism, and keeps
// exactly x_in per recomputed layer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/cpu/blas.h"
#include "model_test_util.h"
#include "parallel/cp/context_parallel.h"
#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "runtime/communicator.h"
#include "runtime/error.h"

namespace {

using troupe::parallel::decoder;
using troupe::parallel::fb_options;
using troupe::parallel::model_weights;
using troupe::parallel::memo::memo_options;
using troupe::parallel::memo::memo_swap;
using troupe::runtime::model_config;

constexpr int64_t B = 2, T = 64;

model_config dense_config(bool bias, bool tied) {
  std::string j = R"({"model_type":"llama","vocab_size":50,"hidden_size":64,"intermediate_size":96,
      "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":128,
      "rms_norm_eps":1e-5,"rope_theta":10000.0,"attention_bias":)" +
                  std::string(bias ? "true" : "false") + R"(,"tie_word_embeddings":)" + (tied ? "true" : "false") +
                  "}";
  return troupe::runtime::parse_hf_config(j, "memo_swap_test");
}

// recompute_dense's row count for one swapped dense layer with n_swap rows restored: rmsnorm x2
// (out and rstd), swiglu on rows [n_swap, N); each of the q, k, v, o, gate, up matmuls from the
// start of the forward's sgemm block holding row n_swap (kernels/cpu/blas.h, invariant 4).
int64_t recomputed_per_layer(const model_config& c, int64_t N, int64_t n_swap) {
  if (n_swap >= N) return 0;
  namespace kc = troupe::kernels::cpu;
  const int64_t C = c.hidden, QD = c.n_heads * c.head_dim, KVD = c.n_kv_heads * c.head_dim, I = c.intermediate;
  int64_t rows = 5 * (N - n_swap);
  const int64_t mm[6][2] = {{QD, C}, {KVD, C}, {KVD, C}, {C, QD}, {I, C}, {I, C}};  // (OC, K) per matmul
  for (const auto& m : mm) rows += N - kc::sgemm_rows_start(N, m[0], m[1], n_swap);
  return rows;
}

struct step {
  float loss[2] = {0, 0};
  model_weights grads;
  size_t saved_bytes = 0;  // sum of saved() bytes after the call
};

// Two forward_backward calls accumulating into one gradient set (the second reuses the buffers).
step run(const model_weights& w, const std::vector<int32_t>& ids, const std::vector<int32_t>& tg, memo_swap* m) {
  decoder dec(w);
  step s;
  s.grads = model_weights::zeros_like(w);
  fb_options o;
  o.memo = m;
  for (int i = 0; i < 2; ++i) s.loss[i] = dec.forward_backward(ids.data(), tg.data(), B, T, s.grads, o);
  for (const auto& a : dec.saved()) s.saved_bytes += a.bytes();
  return s;
}

void expect_bitwise(const step& ref, const step& got, const std::string& what) {
  EXPECT_EQ(std::memcmp(&ref.loss, &got.loss, sizeof ref.loss), 0) << what << ": loss " << got.loss[0] << " vs "
                                                                   << ref.loss[0];
  auto pr = ref.grads.parameters(), pg = got.grads.parameters();
  ASSERT_EQ(pr.size(), pg.size());
  for (size_t i = 0; i < pr.size(); ++i) {
    ASSERT_EQ(pr[i].first, pg[i].first);
    ASSERT_EQ(pr[i].second.nbytes(), pg[i].second.nbytes());
    EXPECT_EQ(std::memcmp(pr[i].second.data<float>(), pg[i].second.data<float>(), pr[i].second.nbytes()), 0)
        << what << ": gradient " << pr[i].first << " differs";
  }
}

void check_dense(const model_config& c, const std::string& name) {
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 11);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  const int64_t N = B * T, C = c.hidden, QD = c.n_heads * c.head_dim, KVD = c.n_kv_heads * c.head_dim,
                I = c.intermediate, L = c.n_layers;
  const size_t f = sizeof(float);
  const size_t whole = f * static_cast<size_t>(N * C + N * QD + B * c.n_heads * T);  // x_in, att, lse
  const size_t per_token = f * static_cast<size_t>(3 * C + 2 + QD + 2 * KVD + 3 * I);  // the token-split ones
  const size_t layer = whole + per_token * static_cast<size_t>(N);
  ASSERT_EQ(ref.saved_bytes, layer * static_cast<size_t>(L));

  for (int64_t keep : {int64_t{0}, int64_t{2}})
    for (double alpha : {0.0, 0.25, 0.3, 0.5, 1.0})
      for (double bw : {0.0, 2.0}) {
        if (bw > 0 && alpha != 0.5) continue;  // the bandwidth cap once per keep
        const std::string what = name + " alpha=" + std::to_string(alpha) + " keep=" + std::to_string(keep) +
                                 " gbps=" + std::to_string(bw);
        memo_swap m(memo_options{alpha, keep, bw});
        const step got = run(w, ids, tg, &m);
        expect_bitwise(ref, got, what);
        const int64_t swapped = L - keep, n_swap = static_cast<int64_t>(alpha * static_cast<double>(N) + 0.5);
        const auto& s = m.stats();
        EXPECT_EQ(s.swapped_layers, swapped) << what;
        EXPECT_EQ(s.swapped_tokens, n_swap) << what;
        EXPECT_EQ(s.device_bytes_off, layer * static_cast<size_t>(L)) << what;
        EXPECT_EQ(s.device_bytes_resident, layer * static_cast<size_t>(keep)) << what;
        EXPECT_LT(s.device_bytes_resident, s.device_bytes_off) << what;
        const size_t host = (whole + per_token * static_cast<size_t>(n_swap)) * static_cast<size_t>(swapped);
        EXPECT_EQ(s.host_bytes, host) << what;
        EXPECT_EQ(s.d2h_bytes, host) << what;
        EXPECT_EQ(s.h2d_bytes, host) << what;
        EXPECT_EQ(s.recomputed_rows, recomputed_per_layer(c, N, n_swap) * swapped) << what;
        // The rounding buffers hold whole layers (the dropped rows are freed with their tensor).
        EXPECT_EQ(s.rounding_bytes_peak, layer * static_cast<size_t>(std::min<int64_t>(2, swapped))) << what;
        // After the call the swapped layers hold nothing in saved(); the kept ones all they had.
        EXPECT_EQ(got.saved_bytes, layer * static_cast<size_t>(keep)) << what;
      }
}

TEST(MemoSwap, DenseGqaBitwise) { check_dense(dense_config(false, false), "gqa"); }
TEST(MemoSwap, AttentionBiasBitwise) { check_dense(dense_config(true, false), "bias"); }
TEST(MemoSwap, TiedBitwise) { check_dense(dense_config(false, true), "tied"); }

// Only the dropped rows are recomputed (plus the rest of the sgemm block holding the first of
// them): α = 0.3 drops rows [38, 128) and the matmuls start at row 32 (blocks of 16), so the
// count is 5·90 + 6·96 per swapped layer, below α = 0's 11·128; still bitwise equal to memo off.
TEST(MemoSwap, RecomputesOnlyDroppedRows) {
  const model_config c = dense_config(true, false);
  const model_weights w = model_weights::random_init(c, 17, 0.05f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 19);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  const int64_t N = B * T, keep = 1, swapped = c.n_layers - keep;
  int64_t rows[2] = {0, 0};
  int i = 0;
  for (double alpha : {0.0, 0.3}) {
    memo_swap m(memo_options{alpha, keep, 0});
    const step got = run(w, ids, tg, &m);
    expect_bitwise(ref, got, "alpha=" + std::to_string(alpha));
    const int64_t n_swap = m.stats().swapped_tokens;
    EXPECT_EQ(n_swap, alpha == 0.0 ? 0 : 38);
    rows[i++] = m.stats().recomputed_rows;
    EXPECT_EQ(m.stats().recomputed_rows, recomputed_per_layer(c, N, n_swap) * swapped) << alpha;
  }
  EXPECT_EQ(rows[0], 11 * N * swapped);
  EXPECT_EQ(rows[1], (5 * (N - 38) + 6 * (N - 32)) * swapped);
  EXPECT_LT(rows[1], rows[0]);
  // α = 0.5 recomputes half of α = 0's rows here (64 is a block start).
  memo_swap half(memo_options{0.5, keep, 0});
  expect_bitwise(ref, run(w, ids, tg, &half), "alpha=0.5");
  EXPECT_EQ(half.stats().recomputed_rows, 11 * (N - 64) * swapped);
  EXPECT_LT(half.stats().recomputed_rows, rows[0]);
}

// MoE layers (qwen2_moe: a dense and a sparse layer) are swapped whole: still bitwise.
TEST(MemoSwap, MoeSwappedWholeBitwise) {
  const model_config c = model_test::micro_config("qwen2_moe");
  const model_weights w = model_weights::random_init(c, 3, 0.1f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 5);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  for (double alpha : {0.0, 0.5}) {
    memo_swap m(memo_options{alpha, 0, 0});
    const step got = run(w, ids, tg, &m);
    expect_bitwise(ref, got, "qwen2_moe alpha=" + std::to_string(alpha));
    EXPECT_EQ(m.stats().swapped_layers, 2);
    // Only the sparse layer's routing vectors stay: offsets (E+1), row_slot and slot_row (N*top_k) int32.
    const int64_t routing = c.n_experts + 1 + 2 * B * T * c.top_k;
    EXPECT_EQ(m.stats().device_bytes_resident, sizeof(int32_t) * static_cast<size_t>(routing));
    EXPECT_GT(m.stats().device_bytes_off, 0u);
    EXPECT_EQ(m.stats().d2h_bytes, m.stats().h2d_bytes);
  }
}

// Under ring context parallelism (2 ranks on threads) each rank's gradients are bitwise those of memo off.
TEST(MemoSwap, RingContextParallelBitwise) {
  using troupe::parallel::context_parallel;
  const model_config c = dense_config(true, false);
  const model_weights w = model_weights::random_init(c, 9, 0.05f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 13);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  constexpr int P = 2;
  const int64_t Tl = T / P;
  auto rank_run = [&](double alpha, bool full = false) {  // alpha < 0: memo off
    auto group = troupe::runtime::make_inproc_group(P, 20000);
    std::vector<model_weights> g(P);
    std::vector<std::exception_ptr> err(P);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
      th.emplace_back([&, r] {
        try {
          std::vector<int32_t> ri(static_cast<size_t>(B * Tl)), rt(ri.size());
          for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < Tl; ++t) {
              ri[static_cast<size_t>(b * Tl + t)] = ids[static_cast<size_t>(b * T + r * Tl + t)];
              rt[static_cast<size_t>(b * Tl + t)] = tg[static_cast<size_t>(b * T + r * Tl + t)];
            }
          decoder dec(w);
          const context_parallel cp{.comm = group[static_cast<size_t>(r)].get(),
                                    .mode = troupe::parallel::cp_mode::ring};
          dec.set_context_parallel(&cp);
          memo_swap m(memo_options{alpha < 0 ? 0.0 : alpha, 1, 0, full});
          fb_options o;
          o.loss_denominator = static_cast<double>(B * (T - 1));
          o.memo = alpha < 0 ? nullptr : &m;
          g[static_cast<size_t>(r)] = model_weights::zeros_like(w);
          dec.forward_backward(ri.data(), rt.data(), B, Tl, g[static_cast<size_t>(r)], o);
        } catch (...) {
          err[static_cast<size_t>(r)] = std::current_exception();
          group[static_cast<size_t>(r)]->abort("rank failed");
        }
      });
    for (auto& t : th) t.join();
    for (auto& e : err)
      if (e) std::rethrow_exception(e);
    return g;
  };
  const auto ref = rank_run(-1);
  for (double alpha : {0.0, 0.5, -2.0}) {  // -2: full recompute (the forward's ring exchange runs again)
    const bool full = alpha == -2.0;
    const auto got = rank_run(full ? 0.0 : alpha, full);
    for (int r = 0; r < P; ++r) {
      auto pr = ref[static_cast<size_t>(r)].parameters(), pg = got[static_cast<size_t>(r)].parameters();
      for (size_t i = 0; i < pr.size(); ++i)
        EXPECT_EQ(std::memcmp(pr[i].second.data<float>(), pg[i].second.data<float>(), pr[i].second.nbytes()), 0)
            << "cp rank " << r << (full ? " full recompute" : " alpha " + std::to_string(alpha)) << ": "
            << pr[i].first;
    }
  }
}

// Full recompute (the Megatron-style baseline): only x_in of a recomputed layer stays on the device,
// nothing goes to host, each recomputed layer reruns its N rows; bitwise equal to memo off.
void check_full_recompute(const model_config& c, const std::string& name) {
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 11);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  const int64_t N = B * T, L = c.n_layers;
  const size_t layer = ref.saved_bytes / static_cast<size_t>(L);
  const size_t x_in = sizeof(float) * static_cast<size_t>(N * c.hidden);
  for (int64_t keep : {int64_t{0}, int64_t{2}}) {
    const std::string what = name + " full recompute keep=" + std::to_string(keep);
    // α and the bandwidth cap are ignored in this mode.
    memo_swap m(memo_options{.alpha = 0.3, .keep_last_layers = keep, .copy_bandwidth_gbps = 2, .full_recompute = true});
    const step got = run(w, ids, tg, &m);
    expect_bitwise(ref, got, what);
    const int64_t recomputed = L - keep;
    const auto& s = m.stats();
    EXPECT_EQ(s.swapped_layers, recomputed) << what;
    EXPECT_EQ(s.swapped_tokens, 0) << what;
    EXPECT_EQ(s.recomputed_rows, N * recomputed) << what;
    EXPECT_EQ(s.device_bytes_off, layer * static_cast<size_t>(L)) << what;
    EXPECT_EQ(s.device_bytes_resident, x_in * static_cast<size_t>(recomputed) + layer * static_cast<size_t>(keep))
        << what;
    EXPECT_EQ(s.host_bytes, 0u) << what;
    EXPECT_EQ(s.d2h_bytes, 0u) << what;
    EXPECT_EQ(s.h2d_bytes, 0u) << what;
    EXPECT_EQ(s.rounding_bytes_peak, 0u) << what;
    EXPECT_EQ(got.saved_bytes, layer * static_cast<size_t>(keep)) << what;  // emptied after backward
  }
}

TEST(MemoSwap, FullRecomputeDenseBitwise) {
  check_full_recompute(dense_config(false, false), "gqa");
  check_full_recompute(dense_config(true, true), "bias+tied");
}

// MoE: the routing vectors are dropped too (layer_forward rebuilds them), so only x_in stays.
TEST(MemoSwap, FullRecomputeMoeBitwise) {
  const model_config c = model_test::micro_config("qwen2_moe");
  const model_weights w = model_weights::random_init(c, 3, 0.1f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 5);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  memo_swap m(memo_options{.alpha = 1.0, .keep_last_layers = 0, .copy_bandwidth_gbps = 0, .full_recompute = true});
  expect_bitwise(ref, run(w, ids, tg, &m), "qwen2_moe full recompute");
  EXPECT_EQ(m.stats().swapped_layers, c.n_layers);
  EXPECT_EQ(m.stats().recomputed_rows, B * T * c.n_layers);
  EXPECT_EQ(m.stats().device_bytes_resident, sizeof(float) * static_cast<size_t>(B * T * c.hidden * c.n_layers));
  EXPECT_EQ(m.stats().host_bytes, 0u);
}

// keep_last_layers >= L swaps nothing; a call whose targets are all ignored (no backward) leaves
// the engine ready for the next call, which is still bitwise equal.
TEST(MemoSwap, NothingSwappedAndSkippedBackward) {
  const model_config c = dense_config(false, false);
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  const auto ids = model_test::random_ids(B * T, c.vocab_size, 11);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  const step ref = run(w, ids, tg, nullptr);
  memo_swap none(memo_options{0.5, c.n_layers, 0});
  const step got = run(w, ids, tg, &none);
  expect_bitwise(ref, got, "keep all");
  EXPECT_EQ(none.stats().swapped_layers, 0);
  EXPECT_EQ(none.stats().host_bytes, 0u);
  EXPECT_EQ(none.stats().device_bytes_resident, none.stats().device_bytes_off);

  memo_swap m(memo_options{0.25, 1, 0});
  decoder dec(w);
  model_weights g = model_weights::zeros_like(w);
  fb_options o;
  o.memo = &m;
  const std::vector<int32_t> ignored(tg.size(), -1);
  EXPECT_EQ(dec.forward_backward(ids.data(), ignored.data(), B, T, g, o), 0.0f);
  step s;
  s.grads = std::move(g);
  for (int i = 0; i < 2; ++i) s.loss[i] = dec.forward_backward(ids.data(), tg.data(), B, T, s.grads, o);
  expect_bitwise(ref, s, "after a skipped backward");
}

TEST(MemoSwap, RejectsBadOptions) {
  EXPECT_THROW(memo_swap(memo_options{1.5, 2, 0}), troupe::runtime::error);
  EXPECT_THROW(memo_swap(memo_options{0.5, -1, 0}), troupe::runtime::error);
  EXPECT_THROW(memo_swap(memo_options{0.5, 2, -3}), troupe::runtime::error);
}

}  // namespace
