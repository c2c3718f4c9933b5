// tests/unit/memo_arena_test.cpp — MEMO's step arena (parallel/memo/arena.h): a recorded step of
// the real decoder is planned bi-level (dense) or flat (dense + MoE mixed), the plan verifies,
// and later steps served from the planned arena give loss and gradients bitwise equal to the
// heap, with and without MEMO swapping, with no allocation leaving the plan; a step whose shape
// differs from the plan falls back to the heap (counted) and stays correct; the trace at another
// seq_len is extrapolated exactly from two recordings. A full-recompute step (memo_options::
// full_recompute) is planned and replayed bitwise too, with a lower max live than no offload.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "parallel/memo/arena.h"
#include "parallel/memo/caching_allocator_sim.h"
#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "runtime/error.h"

namespace {

using troupe::parallel::decoder;
using troupe::parallel::fb_options;
using troupe::parallel::model_weights;
using namespace troupe::parallel::memo;
using troupe::runtime::model_config;

model_config dense_config() {
  return troupe::runtime::parse_hf_config(
      R"({"model_type":"llama","vocab_size":50,"hidden_size":64,"intermediate_size":96,
      "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":256,
      "rms_norm_eps":1e-5,"rope_theta":10000.0})",
      "memo_arena_test");
}

struct result {
  float loss = 0;
  model_weights grads;
};

// One forward_backward on fresh gradients, with the given arena / memo engine (either may be null).
result step(decoder& dec, const model_weights& w, int64_t B, int64_t T, step_arena* arena, memo_swap* memo,
            uint32_t seed = 5) {
  const auto ids = model_test::random_ids(B * T, w.config().vocab_size, seed);
  const auto tg = troupe::parallel::shift_targets(ids, B, T);
  result r;
  r.grads = model_weights::zeros_like(w);
  fb_options o;
  o.arena = arena;
  o.memo = memo;
  r.loss = dec.forward_backward(ids.data(), tg.data(), B, T, r.grads, o);
  return r;
}

void expect_bitwise(const result& ref, const result& got, const std::string& what) {
  EXPECT_EQ(std::memcmp(&ref.loss, &got.loss, sizeof(float)), 0) << what << ": loss " << got.loss << " vs "
                                                                 << ref.loss;
  auto pr = ref.grads.parameters(), pg = got.grads.parameters();
  ASSERT_EQ(pr.size(), pg.size());
  for (size_t i = 0; i < pr.size(); ++i)
    EXPECT_EQ(std::memcmp(pr[i].second.data<float>(), pg[i].second.data<float>(), pr[i].second.nbytes()), 0)
        << what << ": gradient " << pr[i].first << " differs";
}

recorded_step record(decoder& dec, const model_weights& w, int64_t B, int64_t T, memo_swap* memo) {
  auto rec = step_arena::recorder();
  step(dec, w, B, T, rec.get(), memo);
  return rec->recorded();
}

planner_options fast() {
  planner_options o;
  o.time_limit_s = 2;
  return o;
}

TEST(MemoArena, DenseStepIsPlannedBilevelAndBitwiseEqual) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  constexpr int64_t B = 2, T = 64;
  decoder dec(w);
  const result ref = step(dec, w, B, T, nullptr, nullptr);
  const recorded_step r = record(dec, w, B, T, nullptr);
  EXPECT_TRUE(dec.saved().empty()) << "no activation outlives an arena step";
  EXPECT_EQ(r.live_at_end, 0);
  ASSERT_EQ(r.marks.size(), static_cast<size_t>(4 * c.n_layers));
  // Per layer: the saved activations x_in, xn1, rstd1, q, k, v, att, lse, x_mid, xn2, rstd2, gate, up,
  // act are allocated in its forward and outlive it.
  const step_plan p = plan_step(r, fast());
  EXPECT_TRUE(p.bilevel) << p.note;
  EXPECT_GT(p.level1_forward_peak, 0);
  EXPECT_GT(p.level1_backward_peak, 0);
  EXPECT_GE(p.arena_bytes, p.max_live);
  EXPECT_EQ(p.max_live, r.trace.max_live_bytes());
  EXPECT_LE(p.fragmentation(), 1.05) << "arena " << p.arena_bytes << " for max live " << p.max_live;
  const caching_replay cr = replay_caching_allocator(r.trace.events());
  EXPECT_LE(p.arena_bytes, cr.reserved_peak);

  step_arena arena(p);
  for (int i = 0; i < 2; ++i) {  // twice: the arena is reused step after step
    const result got = step(dec, w, B, T, &arena, nullptr);
    expect_bitwise(ref, got, "planned arena, step " + std::to_string(i));
  }
  const arena_stats s = arena.stats();
  EXPECT_EQ(s.fallbacks, 0);
  EXPECT_EQ(s.steps, 2);
  EXPECT_EQ(s.allocations, static_cast<int64_t>(p.size.size()));
  EXPECT_EQ(s.live_bytes, 0u);
  EXPECT_EQ(static_cast<int64_t>(s.peak_bytes), p.max_live);
}

TEST(MemoArena, WithMemoSwappingTheArenaIsSmallerAndStillBitwise) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  constexpr int64_t B = 2, T = 64;
  decoder dec(w);
  const result ref = step(dec, w, B, T, nullptr, nullptr);
  const step_plan off = plan_step(record(dec, w, B, T, nullptr), fast());
  for (double alpha : {0.0, 0.5, 1.0}) {
    memo_swap m({.alpha = alpha, .keep_last_layers = 1, .copy_bandwidth_gbps = 0});
    const recorded_step r = record(dec, w, B, T, &m);
    const step_plan p = plan_step(r, fast());
    EXPECT_LT(p.max_live, off.max_live) << "alpha " << alpha;
    EXPECT_LT(p.arena_bytes, off.arena_bytes) << "alpha " << alpha;
    step_arena arena(p);
    const result got = step(dec, w, B, T, &arena, &m);
    expect_bitwise(ref, got, "memo alpha " + std::to_string(alpha));
    EXPECT_EQ(arena.stats().fallbacks, 0) << "alpha " << alpha;
  }
}

TEST(MemoArena, FullRecomputeIsPlannedSmallerAndBitwise) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  constexpr int64_t B = 2, T = 64;
  decoder dec(w);
  const result ref = step(dec, w, B, T, nullptr, nullptr);
  const step_plan off = plan_step(record(dec, w, B, T, nullptr), fast());
  memo_swap m({.alpha = 1.0, .keep_last_layers = 1, .copy_bandwidth_gbps = 0, .full_recompute = true});
  const recorded_step r = record(dec, w, B, T, &m);
  EXPECT_EQ(r.live_at_end, 0);
  const step_plan p = plan_step(r, fast());
  EXPECT_LT(p.max_live, off.max_live);
  EXPECT_LT(p.arena_bytes, off.arena_bytes);
  EXPECT_GE(p.arena_bytes, p.max_live);
  step_arena arena(p);
  for (int i = 0; i < 2; ++i)
    expect_bitwise(ref, step(dec, w, B, T, &arena, &m), "full recompute, planned arena, step " + std::to_string(i));
  EXPECT_EQ(arena.stats().fallbacks, 0);
  EXPECT_EQ(arena.stats().live_bytes, 0u);
  EXPECT_EQ(m.stats().recomputed_rows, B * T * (c.n_layers - 1));
}

TEST(MemoArena, MixedDenseAndMoeLayersArePlannedFlat) {
  const model_config c = model_test::micro_config("qwen2_moe");  // a dense and a sparse layer
  const model_weights w = model_weights::random_init(c, 3, 0.1f);
  constexpr int64_t B = 2, T = 8;
  decoder dec(w);
  const result ref = step(dec, w, B, T, nullptr, nullptr);
  const step_plan p = plan_step(record(dec, w, B, T, nullptr), fast());
  EXPECT_FALSE(p.bilevel);
  EXPECT_NE(p.note.find("flat"), std::string::npos) << p.note;
  step_arena arena(p);
  expect_bitwise(ref, step(dec, w, B, T, &arena, nullptr), "qwen2_moe flat plan");
  EXPECT_EQ(arena.stats().fallbacks, 0);
}

TEST(MemoArena, AnotherShapeFallsBackToTheHeapAndStaysCorrect) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  decoder dec(w);
  step_arena arena(plan_step(record(dec, w, 2, 32, nullptr), fast()));
  const result ref = step(dec, w, 2, 48, nullptr, nullptr);
  expect_bitwise(ref, step(dec, w, 2, 48, &arena, nullptr), "seq_len 48 in a plan for 32");
  EXPECT_GT(arena.stats().fallbacks, 0);
  EXPECT_EQ(arena.stats().live_bytes, 0u);
}

TEST(MemoArena, OverlappingPlanIsCaughtAtRuntime) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  decoder dec(w);
  step_plan bad = plan_step(record(dec, w, 2, 32, nullptr), fast());
  for (auto& o : bad.offset) o = 0;  // every tensor at offset 0
  step_arena arena(bad);
  const result ref = step(dec, w, 2, 32, nullptr, nullptr);
  expect_bitwise(ref, step(dec, w, 2, 32, &arena, nullptr), "overlapping plan");
  EXPECT_GT(arena.stats().fallbacks, 0);
}

TEST(MemoArena, TraceAtAnotherSeqLenIsExtrapolatedExactly) {
  const model_config c = dense_config();
  const model_weights w = model_weights::random_init(c, 7, 0.05f);
  decoder dec(w);
  memo_swap m({.alpha = 0.5, .keep_last_layers = 1, .copy_bandwidth_gbps = 0});
  const recorded_step a = record(dec, w, 2, 16, &m), b = record(dec, w, 2, 32, &m), t = record(dec, w, 2, 80, &m);
  const recorded_step x = extrapolate_step(a, 16, b, 32, 80);
  ASSERT_EQ(x.trace.events().size(), t.trace.events().size());
  for (size_t i = 0; i < x.trace.events().size(); ++i) {
    const auto &e = x.trace.events()[i], &f = t.trace.events()[i];
    EXPECT_EQ(e.size, f.size) << i << " " << f.name;
    EXPECT_EQ(e.alloc_time, f.alloc_time) << i;
    EXPECT_EQ(e.free_time, f.free_time) << i;
  }
  ASSERT_EQ(x.marks.size(), t.marks.size());
  // A step of another batch size is not affine in seq_len with this one: named error.
  const recorded_step other = record(dec, w, 3, 32, nullptr);
  EXPECT_THROW(extrapolate_step(a, 16, other, 32, 80), troupe::runtime::error);
}

}  // namespace
