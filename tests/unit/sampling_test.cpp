// Sampling: greedy = argmax, the filtered distributions against hand-computed ones (exact
// and over 20k draws), seed determinism; parameter validation; stop strings across chunks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "elastic/engine/sampling.h"
#include "parallel/model/generate.h"
#include "runtime/error.h"

namespace {

using namespace troupe;
using elastic::sampler;
using elastic::sampling_params;
using elastic::stop_checker;
using elastic::logprob_of;
using elastic::sampling_probs;
using elastic::token_logprob;

std::vector<float> log_probs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(x > 0 ? static_cast<float>(std::log(x)) : -INFINITY);
  return l;
}

sampling_params with(double temperature, int64_t top_k, double top_p, uint64_t seed = 1) {
  sampling_params p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

std::vector<double> empirical(const std::vector<float>& logits, const sampling_params& p, int draws) {
  sampler s(p);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) f[static_cast<size_t>(s.sample(logits.data(), static_cast<int64_t>(logits.size())))] += 1;
  for (auto& x : f) x /= draws;
  return f;
}

TEST(Sampling, GreedyIsArgmaxLowestIdOnTies) {
  const std::vector<float> l{0.5f, 2.0f, -1.0f, 2.0f, 1.9f};
  sampler s(with(0.0, 0, 1.0));
  EXPECT_EQ(s.sample(l.data(), 5), 1);
  EXPECT_EQ(s.sample(l.data(), 5), parallel::argmax_token(l.data(), 5));
  const std::vector<float> all_equal(7, 3.0f);
  EXPECT_EQ(s.sample(all_equal.data(), 7), 0);
  // top_k = 1 at any temperature is greedy too, ties included.
  sampler k1(with(1.3, 1, 1.0, 99));
  for (int i = 0; i < 50; ++i) EXPECT_EQ(k1.sample(l.data(), 5), 1);
  // Random logits: greedy and top_k = 1 agree with argmax_token.
  std::mt19937 g(7);
  std::normal_distribution<float> n(0.f, 3.f);
  sampler k1b(with(0.8, 1, 0.5, 3));
  for (int t = 0; t < 100; ++t) {
    std::vector<float> r(300);
    for (auto& x : r) x = n(g);
    const int32_t want = parallel::argmax_token(r.data(), 300);
    EXPECT_EQ(s.sample(r.data(), 300), want);
    EXPECT_EQ(k1b.sample(r.data(), 300), want);
  }
}

struct dist_case {
  const char* name;
  sampling_params p;
  std::vector<double> want;  // by hand from p = (0.4, 0.3, 0.2, 0.1)
};

TEST(Sampling, FilteredDistributionsMatchHandComputed) {
  const auto logits = log_probs({0.4, 0.3, 0.2, 0.1});
  const std::vector<dist_case> cases = {
      {"T=1", with(1.0, 0, 1.0, 11), {0.4, 0.3, 0.2, 0.1}},
      // p^2 / (0.16 + 0.09 + 0.04 + 0.01)
      {"T=0.5", with(0.5, 0, 1.0, 12), {0.16 / 0.3, 0.09 / 0.3, 0.04 / 0.3, 0.01 / 0.3}},
      // sqrt(p) / sum sqrt(p)
      {"T=2", with(2.0, 0, 1.0, 13), {}},
      {"top_k=2", with(1.0, 2, 1.0, 14), {0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0}},
      // cumulative 0.4, 0.7, 0.9 >= 0.8: three kept
      {"top_p=0.8", with(1.0, 0, 0.8, 15), {0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0}},
      // cumulative 0.4 >= 0.35: one kept
      {"top_p=0.35", with(1.0, 0, 0.35, 16), {1.0, 0.0, 0.0, 0.0}},
      // top-3 renormalised: 0.444, 0.778 >= 0.6: two kept
      {"top_k=3,top_p=0.6", with(1.0, 3, 0.6, 17), {0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0}},
      // T=0.5 then top_p: 0.533, 0.833 >= 0.8: two kept, 0.16/0.25 and 0.09/0.25
      {"T=0.5,top_p=0.8", with(0.5, 0, 0.8, 18), {0.64, 0.36, 0.0, 0.0}},
  };
  for (auto c : cases) {
    if (c.want.empty()) {
      double z = 0;
      for (double x : {0.4, 0.3, 0.2, 0.1}) z += std::sqrt(x);
      for (double x : {0.4, 0.3, 0.2, 0.1}) c.want.push_back(std::sqrt(x) / z);
    }
    const auto exact = elastic::sampling_probs(logits.data(), 4, c.p);
    const auto got = empirical(logits, c.p, 20000);
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_NEAR(exact[i], c.want[i], 1e-6) << c.name << " id " << i;
      EXPECT_NEAR(got[i], c.want[i], 0.01) << c.name << " id " << i;
      if (c.want[i] == 0.0) {
        EXPECT_EQ(got[i], 0.0) << c.name << ": filtered id " << i << " was drawn";
      }
    }
  }
}

// top_p without top_k on a large vocabulary: the sampler sorts a growing head of the vocabulary;
// the kept set must equal the nucleus of a full sort (ties by id) for heads of 1, ~100 and ~3000
// ids out of 5000 (the growth 64 -> 256 -> 1024 -> 4096 -> 5000 all taken).
TEST(Sampling, NucleusOfALargeVocabularyEqualsTheFullSort) {
  const int64_t V = 5000;
  std::vector<float> logits(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i)  // a slowly decaying, shuffled distribution with repeated values (ties)
    logits[static_cast<size_t>((i * 7919) % V)] = -0.002f * static_cast<float>(i / 3);
  for (double top_p : {1e-6, 0.05, 0.6, 0.999}) {
    const auto got = elastic::sampling_probs(logits.data(), V, with(1.0, 0, top_p));
    std::vector<double> prob(static_cast<size_t>(V));
    const float mx = *std::max_element(logits.begin(), logits.end());
    double all = 0;
    for (int64_t i = 0; i < V; ++i)
      all += prob[static_cast<size_t>(i)] = std::exp(double(logits[static_cast<size_t>(i)]) - mx);
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      const double pa = prob[static_cast<size_t>(a)], pb = prob[static_cast<size_t>(b)];
      return pa != pb ? pa > pb : a < b;
    });
    double cum = 0, kept_mass = 0;
    size_t kept = 0;
    while (kept < order.size() && cum < top_p * all) cum += prob[static_cast<size_t>(order[kept++])];
    kept_mass = cum;
    std::vector<double> want(static_cast<size_t>(V), 0.0);
    for (size_t j = 0; j < kept; ++j)
      want[static_cast<size_t>(order[j])] = prob[static_cast<size_t>(order[j])] / kept_mass;
    int64_t nonzero = 0;
    for (int64_t i = 0; i < V; ++i) {
      nonzero += got[static_cast<size_t>(i)] > 0;
      ASSERT_NEAR(got[static_cast<size_t>(i)], want[static_cast<size_t>(i)], 1e-12) << "top_p " << top_p << " id " << i;
    }
    EXPECT_EQ(nonzero, static_cast<int64_t>(kept)) << "top_p " << top_p;
    if (top_p == 0.6) {
      EXPECT_GT(kept, 1024u);  // the head grew past two steps
    }
  }
}

TEST(Sampling, TiesAtTheFilterEdgeKeepTheLowerId) {
  const std::vector<float> l{0.0f, 1.0f, 1.0f, 1.0f};
  // top_k = 2 among three equal maxima keeps ids 1 and 2.
  const auto got = empirical(l, with(1.0, 2, 1.0, 5), 20000);
  EXPECT_NEAR(got[1], 0.5, 0.01);
  EXPECT_NEAR(got[2], 0.5, 0.01);
  EXPECT_EQ(got[0], 0.0);
  EXPECT_EQ(got[3], 0.0);
  // -inf and NaN logits are never drawn.
  const std::vector<float> masked{-INFINITY, 0.0f, NAN, 0.0f};
  const auto m = empirical(masked, with(1.0, 0, 1.0, 6), 20000);
  EXPECT_EQ(m[0], 0.0);
  EXPECT_EQ(m[2], 0.0);
  EXPECT_NEAR(m[1], 0.5, 0.01);
}

TEST(Sampling, SeedDeterminismIndependentOfTheBatch) {
  std::mt19937 g(3);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<std::vector<float>> steps(200, std::vector<float>(64));
  for (auto& s : steps)
    for (auto& x : s) x = n(g);
  const auto p = with(0.9, 40, 0.95, 1234);
  auto run_alone = [&] {
    sampler s(p);
    std::vector<int32_t> out;
    for (const auto& l : steps) out.push_back(s.sample(l.data(), 64));
    return out;
  };
  const auto alone = run_alone();
  EXPECT_EQ(run_alone(), alone);
  // Interleaved with two other requests (one greedy, one with another seed).
  sampler a(p), other(with(1.0, 0, 1.0, 99)), greedy(with(0.0, 0, 1.0));
  std::vector<int32_t> batched, other_out;
  for (const auto& l : steps) {
    other_out.push_back(other.sample(l.data(), 64));
    batched.push_back(a.sample(l.data(), 64));
    greedy.sample(l.data(), 64);
    other_out.push_back(other.sample(l.data(), 64));
  }
  EXPECT_EQ(batched, alone);
  // Another seed gives another sequence.
  sampler b(with(0.9, 40, 0.95, 1235));
  int differ = 0;
  for (size_t i = 0; i < steps.size(); ++i) differ += b.sample(steps[i].data(), 64) != alone[i];
  EXPECT_GT(differ, 50);
}

TEST(Sampling, InvalidParamsNameTheField) {
  struct bad {
    sampling_params p;
    const char* field;
    const char* message;
  };
  auto mk = [](auto edit) {
    sampling_params p;
    edit(p);
    return p;
  };
  const std::vector<bad> cases = {
      {mk([](auto& p) { p.temperature = 2.5; }), "temperature", "2.5 is greater than the maximum of 2 - 'temperature'"},
      {mk([](auto& p) { p.temperature = -0.1; }), "temperature", "-0.1 is less than the minimum of 0 - 'temperature'"},
      {mk([](auto& p) { p.temperature = NAN; }), "temperature", "nan is not a valid number - 'temperature'"},
      {mk([](auto& p) { p.top_p = 0.0; }), "top_p", "0 is less than or equal to the exclusive minimum of 0 - 'top_p'"},
      {mk([](auto& p) { p.top_p = 1.5; }), "top_p", "1.5 is greater than the maximum of 1 - 'top_p'"},
      {mk([](auto& p) { p.top_k = -1; }), "top_k", "-1 is less than the minimum of 0 - 'top_k'"},
      {mk([](auto& p) { p.max_tokens = 0; }), "max_tokens", "0 is less than the minimum of 1 - 'max_tokens'"},
      {mk([](auto& p) { p.stop = {"ok", ""}; }), "stop", "'' is too short: a stop string must not be empty - 'stop'"},
      {mk([](auto& p) { p.stop_token_ids = {3, -2}; }), "stop_token_ids",
       "-2 is less than the minimum of 0 - 'stop_token_ids'"},
      {mk([](auto& p) { p.min_tokens = 17; }), "min_tokens", "17 is not in [0, max_tokens = 16] - 'min_tokens'"},
      {mk([](auto& p) { p.min_p = 1.5; }), "min_p", "1.5 is not in [0, 1] - 'min_p'"},
      {mk([](auto& p) { p.presence_penalty = -3; }), "presence_penalty", "-3 is not in [-2, 2] - 'presence_penalty'"},
      {mk([](auto& p) { p.frequency_penalty = NAN; }), "frequency_penalty",
       "nan is not in [-2, 2] - 'frequency_penalty'"},
      {mk([](auto& p) { p.repetition_penalty = 0; }), "repetition_penalty",
       "0 is not in (0, 2] - 'repetition_penalty'"},
      {mk([](auto& p) { p.logit_bias = {{4, 101.0f}}; }), "logit_bias",
       "bias 101 of token 4 is not in [-100, 100] - 'logit_bias'"},
      {mk([](auto& p) { p.logprobs = -2; }), "logprobs", "-2 is less than the minimum of -1 (none) - 'logprobs'"},
  };
  for (const auto& c : cases) {
    const auto e = elastic::check_sampling_params(c.p);
    ASSERT_TRUE(e) << c.field;
    EXPECT_EQ(e->param, c.field);
    EXPECT_EQ(e->message, c.message);
    try {
      sampler s(c.p);
      ADD_FAILURE() << "sampler accepted a bad " << c.field;
    } catch (const runtime::error& err) {
      EXPECT_EQ(err.code(), runtime::errc::invalid_argument);
      EXPECT_EQ(err.message(), c.message);
    }
  }
  // The edges are valid.
  EXPECT_FALSE(elastic::check_sampling_params(mk([](auto& p) {
    p.temperature = 2.0;
    p.top_p = 1.0;
    p.top_k = 0;
    p.max_tokens = 1;
  })));
  EXPECT_FALSE(elastic::check_sampling_params(mk([](auto& p) { p.temperature = 0.0; })));
  EXPECT_FALSE(elastic::check_sampling_params(mk([](auto& p) {  // the prompt's logprobs alone
    p.max_tokens = 0;
    p.prompt_logprobs = 0;
  })));
  // Logits the model broke are an error, not a silent pick.
  sampler s(with(1.0, 0, 1.0));
  const std::vector<float> dead{-INFINITY, NAN};
  EXPECT_THROW(s.sample(dead.data(), 2), runtime::error);
  EXPECT_THROW(s.sample(dead.data(), 0), runtime::error);
}

TEST(Sampling, BiasMaskBlockedIdsAndPenaltiesMoveTheGreedyChoiceByExactAmounts) {
  const std::vector<float> logits = {2.0f, 1.9f, -1.0f, -1.1f};
  auto greedy = [](sampling_params p) {
    p.temperature = 0;
    return p;
  };
  {
    sampler s(greedy({}));
    EXPECT_EQ(s.sample(logits.data(), 4), 0);
    const std::vector<uint8_t> mask = {0, 1, 1, 1};
    EXPECT_EQ(s.sample(logits.data(), 4, mask.data()), 1);
    const std::vector<int32_t> blocked = {0, 1};
    EXPECT_EQ(s.sample(logits.data(), 4, nullptr, blocked), 2);
    const std::vector<uint8_t> none = {0, 0, 0, 0};
    EXPECT_THROW(s.sample(logits.data(), 4, none.data()), troupe::runtime::error);
  }
  {
    sampling_params p = greedy({});
    p.logit_bias = {{3, 3.2f}};  // -1.1 + 3.2 = 2.1 > 2.0
    EXPECT_EQ(sampler(p).sample(logits.data(), 4), 3);
    p.logit_bias = {{3, 3.0f}};  // 1.9 < 2.0
    EXPECT_EQ(sampler(p).sample(logits.data(), 4), 0);
  }
  {
    // repetition: a positive logit is divided (2.0 / 1.1 = 1.818 < 1.9), a negative one multiplied
    sampling_params p = greedy({});
    p.repetition_penalty = 1.1;
    sampler s(p);
    const std::vector<int32_t> prompt = {0, 0, 2};
    s.set_prompt(prompt);
    EXPECT_EQ(s.sample(logits.data(), 4), 1);
    const std::vector<uint8_t> low = {0, 0, 1, 1};  // -1.0 * 1.1 = -1.1 ties -1.1: the lower id
    EXPECT_EQ(s.sample(logits.data(), 4, low.data()), 2);
    p.repetition_penalty = 1.01;  // 2.0 / 1.01 = 1.98 > 1.9
    sampler t(p);
    t.set_prompt(prompt);
    EXPECT_EQ(t.sample(logits.data(), 4), 0);
  }
  {
    // frequency x count and presence once, on generated ids only
    sampling_params p = greedy({});
    p.frequency_penalty = 0.04;
    sampler s(p);
    s.accept(0);
    EXPECT_EQ(s.sample(logits.data(), 4), 0);  // 2.0 - 0.04 = 1.96
    s.accept(0);
    s.accept(0);
    EXPECT_EQ(s.sample(logits.data(), 4), 1);  // 2.0 - 0.12 = 1.88
    p.frequency_penalty = 0;
    p.presence_penalty = 0.05;
    sampler q(p);
    for (int i = 0; i < 5; ++i) q.accept(0);
    EXPECT_EQ(q.sample(logits.data(), 4), 0);  // 1.95: presence does not grow with the count
    p.presence_penalty = 0.2;
    sampler r(p);
    r.accept(0);
    EXPECT_EQ(r.sample(logits.data(), 4), 1);
  }
}

TEST(Sampling, MinPDropsTheUnlikelyTail) {
  const std::vector<float> logits = {0.0f, -1.0f, -3.0f};
  sampling_params p;
  p.min_p = 0.1;  // e^-3 = 0.0498 of the largest is dropped, e^-1 = 0.368 kept
  const auto probs = sampling_probs(logits.data(), 3, p);
  const double z = 1.0 + std::exp(-1.0);
  EXPECT_NEAR(probs[0], 1.0 / z, 1e-12);
  EXPECT_NEAR(probs[1], std::exp(-1.0) / z, 1e-12);
  EXPECT_EQ(probs[2], 0.0);
  p.min_p = 0.4;
  EXPECT_EQ(sampling_probs(logits.data(), 3, p)[1], 0.0);
}

TEST(Sampling, LogprobsAreTheRawLogSoftmaxWithTheMostLikelyFirst) {
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, -2.0f, 0.5f};
  double z = 0;
  for (float l : logits) z += std::exp(double(l));
  const token_logprob lp = logprob_of(logits.data(), 5, 3, 3);
  EXPECT_EQ(lp.id, 3);
  EXPECT_NEAR(lp.logprob, -2.0 - std::log(z), 1e-6);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].first, 1);  // a tie: the lower id first
  EXPECT_EQ(lp.top[1].first, 2);
  EXPECT_EQ(lp.top[2].first, 0);
  EXPECT_NEAR(lp.top[2].second, 1.0 - std::log(z), 1e-6);
  EXPECT_TRUE(logprob_of(logits.data(), 5, 0, 0).top.empty());
  EXPECT_THROW(logprob_of(logits.data(), 5, 5, 0), troupe::runtime::error);
}

TEST(Sampling, FinishReasons) {
  sampling_params p;
  p.max_tokens = 3;
  p.stop_token_ids = {17};
  using elastic::finish_reason;
  EXPECT_EQ(elastic::token_finish_reason(p, 5, 1, 2), finish_reason::none);
  EXPECT_EQ(elastic::token_finish_reason(p, 2, 1, 2), finish_reason::stop);   // eos
  EXPECT_EQ(elastic::token_finish_reason(p, 17, 2, 2), finish_reason::stop);  // stop token
  EXPECT_EQ(elastic::token_finish_reason(p, 5, 3, 2), finish_reason::length);
  EXPECT_EQ(elastic::token_finish_reason(p, 2, 3, 2), finish_reason::stop);  // eos wins at the limit
  EXPECT_EQ(elastic::token_finish_reason(p, 5, 2, -1), finish_reason::none);
  p.ignore_eos = true;
  EXPECT_EQ(elastic::token_finish_reason(p, 2, 1, 2), finish_reason::none);
  EXPECT_STREQ(elastic::finish_reason_name(finish_reason::stop), "stop");
  EXPECT_STREQ(elastic::finish_reason_name(finish_reason::length), "length");
  EXPECT_STREQ(elastic::finish_reason_name(finish_reason::none), "");
}

TEST(StopChecker, StopStringSplitAcrossChunks) {
  stop_checker s({"###"});
  auto c = s.push("Hello #");
  EXPECT_EQ(c.text, "Hello ");  // "#" could start "###": held back
  EXPECT_FALSE(c.stopped);
  EXPECT_EQ(s.held(), "#");
  c = s.push("#");
  EXPECT_EQ(c.text, "");
  EXPECT_EQ(s.held(), "##");
  c = s.push("# tail");
  EXPECT_TRUE(c.stopped);
  EXPECT_EQ(c.text, "");
  EXPECT_EQ(c.stop, "###");
  EXPECT_TRUE(s.stopped());
  // Nothing after a stop is released.
  EXPECT_EQ(s.push("more").text, "");
  EXPECT_EQ(s.flush(), "");
}

TEST(StopChecker, HeldTextIsReleasedWhenItDoesNotContinue) {
  stop_checker s({"</end>"});
  std::string streamed;
  for (const char* chunk : {"a <", "/e", "x> b", " </en", "d"}) {
    const auto c = s.push(chunk);
    EXPECT_FALSE(c.stopped);
    streamed += c.text;
  }
  EXPECT_EQ(streamed, "a </ex> b ");
  EXPECT_EQ(s.held(), "</end");
  streamed += s.flush();  // generation ended by length: the held text goes out
  EXPECT_EQ(streamed, "a </ex> b </end");
  // A chunk ending with a repeated prefix holds only the longest possible start.
  stop_checker t({"aab"});
  EXPECT_EQ(t.push("xaaa").text, "xa");
  EXPECT_EQ(t.held(), "aa");
  const auto c = t.push("b!");
  EXPECT_TRUE(c.stopped);
  EXPECT_EQ(c.text, "");
}

TEST(StopChecker, EarliestOfSeveralStops) {
  stop_checker s({"world", "lo w", "o"});  // at 6, 3 and 4 of "Hello world"
  const auto c = s.push("Hello world");
  EXPECT_TRUE(c.stopped);
  EXPECT_EQ(c.text, "Hel");
  EXPECT_EQ(c.stop, "lo w");
  stop_checker t({"world", "o"});
  const auto d = t.push("Hello world");
  EXPECT_EQ(d.text, "Hell");
  EXPECT_EQ(d.stop, "o");
  // Across chunks: the one that completes first stops generation, and among those
  // completing in the same chunk the earliest occurrence wins.
  stop_checker u({"XYZ", "YZ!"});
  EXPECT_EQ(u.push("ab X").text, "ab ");
  const auto e = u.push("YZ!");
  EXPECT_TRUE(e.stopped);
  EXPECT_EQ(e.stop, "XYZ");
  EXPECT_EQ(e.text, "");
  // No stop strings: everything streams at once.
  stop_checker none({});
  EXPECT_EQ(none.push("abc").text, "abc");
  EXPECT_EQ(none.flush(), "");
}

}  // namespace
