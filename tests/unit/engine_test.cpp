// The serving engine (elastic/engine/engine.h) on the fixture models: greedy output of requests
// batched together equals parallel::generate_greedy per request, token for token, with chunked
// prefill, prefix caching, preemption under a KV cache too small for everyone, and static
// batching; seeded sampling does not depend on the batch; abort and bad input; a sample resumed on
// another engine after any event goes on with exactly the text and tokens the first would have sent;
// a token the tokenizer cannot decode ends its sample alone with an error; a group step aborted midway
// is undone and runs again.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <stdexcept>

#include "engine_harness.h"
#include "runtime/error.h"

namespace {

using namespace troupe;
using namespace troupe::elastic;
using namespace troupe_test;

// Blocks of 4 tokens, 64 of them: the small cache most tests here use.
engine_options small_cache() {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 64;
  return o;
}

void expect_greedy_equal(const std::string& fixture, engine_options o, bool shared_prefix) {
  harness h(fixture, o);
  const int64_t V = h.dec->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts = {prompt_of(5, 1, V), prompt_of(23, 2, V), prompt_of(11, 3, V),
                                               prompt_of(40, 4, V)};
  if (shared_prefix) {  // two requests share a 24-token prefix with the 40-token one
    for (int k = 0; k < 2; ++k) {
      auto p = prompts[3];
      p.resize(24);
      for (int i = 0; i < 3 + k; ++i) p.push_back(static_cast<int32_t>((5 + i * 13 + k) % V));
      prompts.push_back(p);
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) h.submit("r" + std::to_string(i), prompts[i], greedy_params(9));
  h.run();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& c = h.out["r" + std::to_string(i)];
    EXPECT_EQ(c.ids, h.greedy(prompts[i], 9)) << fixture << " request " << i;
    EXPECT_EQ(c.reason, "length");
    EXPECT_EQ(c.finished, 1);
    EXPECT_EQ(c.completion_tokens, 9);
  }
  const auto st = h.eng->stats();
  EXPECT_EQ(st.kv.blocks_used, 0) << "every block is released at the end";
  if (shared_prefix) {
    EXPECT_GT(st.kv.prefix_hit_tokens, 0);
  }
}

TEST(Engine, GreedyBatchedEqualsGenerateGreedyDense) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 256;
  o.max_batch_tokens = 16;  // chunked prefill: the 40-token prompt takes several iterations
  expect_greedy_equal("llama_gqa", o, false);
}

TEST(Engine, GreedyBatchedEqualsGenerateGreedyMoeWithPrefixCaching) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 256;
  o.max_batch_tokens = 24;
  expect_greedy_equal("mixtral_moe", o, true);
}

TEST(Engine, PreemptionByRecomputeKeepsTheOutput) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 16;  // 64 token slots for ~140 tokens of prompts + outputs
  o.max_batch_tokens = 64;
  harness h("mistral_window", o);
  const int64_t V = h.dec->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts = {prompt_of(20, 1, V), prompt_of(18, 2, V), prompt_of(22, 3, V),
                                               prompt_of(15, 4, V)};
  for (size_t i = 0; i < prompts.size(); ++i) h.submit("p" + std::to_string(i), prompts[i], greedy_params(12));
  h.run();
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(h.out["p" + std::to_string(i)].ids, h.greedy(prompts[i], 12)) << "request " << i;
  EXPECT_GT(h.eng->stats().preemptions, 0) << "the cache was meant to run out";
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
}

TEST(Engine, StaticBatchingGivesTheSameTokens) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 256;
  o.static_batching = true;
  expect_greedy_equal("qwen2_moe", o, false);
}

TEST(Engine, SeededSamplingDoesNotDependOnTheBatch) {
  engine_options o;
  o.block_size = 4;
  o.num_blocks = 128;
  sampling_params p;
  p.temperature = 0.9;
  p.top_k = 20;
  p.top_p = 0.9;
  p.seed = 1234;
  p.max_tokens = 10;
  p.ignore_eos = true;
  std::vector<int32_t> alone, together;
  {
    harness h("llama_gqa", o);
    h.submit("a", prompt_of(9, 7, h.dec->config().vocab_size), p);
    h.run();
    alone = h.out["a"].ids;
  }
  {
    harness h("llama_gqa", o);
    const int64_t V = h.dec->config().vocab_size;
    h.submit("x", prompt_of(30, 8, V), greedy_params(5));
    h.submit("a", prompt_of(9, 7, V), p);
    h.submit("y", prompt_of(3, 9, V), greedy_params(15));
    h.run();
    together = h.out["a"].ids;
  }
  EXPECT_EQ(alone.size(), 10u);
  EXPECT_EQ(alone, together);
}

TEST(Engine, AbortFreesTheRequestAndStopStringsEndIt) {
  engine_options o = small_cache();
  harness h("llama_gqa", o);
  const int64_t V = h.dec->config().vocab_size;
  h.submit("long", prompt_of(10, 1, V), greedy_params(200));
  for (int i = 0; i < 5; ++i) h.eng->step();
  EXPECT_GT(h.eng->stats().kv.blocks_used, 0);
  h.eng->abort("long");
  h.run();
  EXPECT_EQ(h.out["long"].reason, "abort");
  EXPECT_EQ(h.out["long"].finished, 1);
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
  EXPECT_EQ(h.eng->stats().aborted, 1);
}

TEST(Engine, BadRequestsAreRefusedBeforeQueueing) {
  engine_options o;
  o.num_blocks = 8;
  o.block_size = 4;
  o.max_waiting = 1;
  harness h("llama_gqa", o);
  const int64_t V = h.dec->config().vocab_size;
  EXPECT_THROW(h.submit("v", {1, static_cast<int32_t>(V)}, greedy_params(2)), runtime::error);
  EXPECT_THROW(h.submit("e", {}, greedy_params(2)), runtime::error);
  sampling_params bad = greedy_params(2);
  bad.top_p = 0;
  EXPECT_THROW(h.submit("p", {1, 2}, bad), runtime::error);
  EXPECT_THROW(h.submit("big", prompt_of(40, 1, V), greedy_params(2)), runtime::error);  // > 8 blocks of 4
  h.submit("ok", {1, 2, 3}, greedy_params(2));
  EXPECT_THROW(h.submit("full", {1, 2, 3}, greedy_params(2)), engine_busy);
  h.out.erase("v");
  h.out.erase("e");
  h.out.erase("p");
  h.out.erase("big");
  h.out.erase("full");
  h.run();
  EXPECT_EQ(h.out["ok"].ids.size(), 2u);
}

// Every event of one request, in order, stepped until it finished.
// since_arrival: how long ago it reached the first rank (its TTFT counts from there).
std::vector<engine_event> run_logged(harness& h, const std::string& id, const std::vector<int32_t>& prompt,
                                     sampling_params p, std::optional<engine_request::resumed> resume = {},
                                     std::chrono::milliseconds since_arrival = std::chrono::milliseconds(0)) {
  std::vector<engine_event> events;
  engine_request r;
  r.id = id;
  r.prompt = prompt;
  r.params = p;
  r.resume = resume;
  r.arrival = std::chrono::steady_clock::now() - since_arrival;
  r.on_event = [&](const engine_event& e) { events.push_back(e); };
  h.eng->submit(std::move(r));
  for (int i = 0; i < 1000 && (events.empty() || !events.back().finished); ++i) h.eng->step();
  return events;
}

TEST(Engine, AResumedSampleContinuesTheStreamExactlyAfterAnyEvent) {
  engine_options o = small_cache();
  harness h("llama_gqa", o);
  const int64_t V = h.dec->config().vocab_size;
  const auto prompt = prompt_of(9, 5, V);
  sampling_params p = greedy_params(24);
  p.logprobs = 1;
  const auto plain = run_logged(h, "plain", prompt, p);
  std::string full;
  for (const auto& e : plain) full += e.text;
  ASSERT_GE(full.size(), 8u) << "the fixture's greedy text is long enough to hold a stop string";
  // A stop string for which some event releases text while holding back a part that may start it
  // (that event has more tokens than the text shown): a move right after it must keep holding it.
  std::vector<engine_event> ref;
  for (size_t at = 1; at + 3 <= full.size() && ref.empty(); ++at) {
    p.stop = {full.substr(at, 3)};
    auto events = run_logged(h, "ref" + std::to_string(at), prompt, p);
    for (size_t j = 0; j + 1 < events.size(); ++j)
      if (events[j].token_ids.size() >= 2 && !events[j].text.empty()) ref = events;
  }
  ASSERT_FALSE(ref.empty()) << "no stop string of the greedy text " << full << " holds text back";
  ASSERT_EQ(ref.back().finish_reason, "stop");
  std::string ref_text;
  std::vector<int32_t> ref_ids;
  for (const auto& e : ref) {
    ref_text += e.text;
    ref_ids.insert(ref_ids.end(), e.token_ids.begin(), e.token_ids.end());
  }
  int cuts = 0;
  for (size_t j = 0; j + 1 < ref.size(); ++j) {  // the stream moves after event j
    engine_request::resumed from;
    from.index = 3;
    std::string sent;
    for (size_t k = 0; k <= j; ++k) {
      sent += ref[k].text;
      from.tokens.insert(from.tokens.end(), ref[k].token_ids.begin(), ref[k].token_ids.end());
      for (const auto& lp : ref[k].logprobs) from.cumulative_logprob += lp.logprob;
    }
    if (from.tokens.empty()) continue;
    const auto rest = run_logged(h, "moved" + std::to_string(j), prompt, p, from);
    std::string text = sent;
    std::vector<int32_t> ids = from.tokens;
    for (const auto& e : rest) {
      EXPECT_EQ(e.index, 3);
      text += e.text;
      ids.insert(ids.end(), e.token_ids.begin(), e.token_ids.end());
    }
    EXPECT_EQ(text, ref_text) << "moved after event " << j;
    EXPECT_EQ(ids, ref_ids) << "moved after event " << j;
    EXPECT_EQ(rest.back().finish_reason, "stop");
    EXPECT_EQ(rest.back().completion_tokens, ref.back().completion_tokens);
    EXPECT_EQ(rest.back().prompt_tokens, static_cast<int64_t>(prompt.size()));
    ++cuts;
  }
  EXPECT_GE(cuts, 2);
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
  engine_request bad;  // more sent tokens than max_tokens allows; n > 1
  bad.id = "bad";
  bad.prompt = prompt;
  bad.params = greedy_params(2);
  bad.resume = engine_request::resumed{0, {1, 2}, 0, false};
  EXPECT_THROW(h.eng->submit(bad), runtime::error);
  bad.params = greedy_params(8);
  bad.n = 2;
  EXPECT_THROW(h.eng->submit(bad), runtime::error);
}

// The byte tokenizer, except that one id cannot be decoded (as an id past a tokenizer's vocabulary).
class tokenizer_without final : public byte_tokenizer_base {
 public:
  explicit tokenizer_without(int32_t bad) : bad_(bad) {}
  std::string decode(std::span<const int32_t> ids, bool s) const override {
    for (int32_t id : ids) check(id);
    return b_.decode(ids, s);
  }
  std::string token_bytes(int32_t id, bool s) const override {
    check(id);
    return b_.token_bytes(id, s);
  }

 private:
  void check(int32_t id) const {
    if (id == bad_) throw std::out_of_range("id " + std::to_string(id) + " is not in this vocabulary");
  }
  int32_t bad_;
};

TEST(Engine, ATokenTheTokenizerCannotDecodeEndsItsSampleAloneWithAnError) {
  engine_options o = small_cache();
  harness probe("llama_gqa", o);
  const int64_t V = probe.dec->config().vocab_size;
  const auto bad_prompt = prompt_of(9, 5, V);
  const int32_t bad = probe.greedy(bad_prompt, 6)[3];  // its 4th token cannot be decoded
  std::vector<int32_t> good_prompt;
  for (int32_t seed = 6; seed < 60 && good_prompt.empty(); ++seed) {
    const auto p = prompt_of(7, seed, V);
    const auto g = probe.greedy(p, 6);
    if (std::find(g.begin(), g.end(), bad) == g.end()) good_prompt = p;
  }
  ASSERT_FALSE(good_prompt.empty());
  harness h("llama_gqa", o, std::make_unique<tokenizer_without>(bad));
  h.submit("bad", bad_prompt, greedy_params(6));
  h.submit("good", good_prompt, greedy_params(6));
  h.run();
  EXPECT_EQ(h.out["bad"].reason, "error");
  EXPECT_NE(h.out["bad"].error.find("token " + std::to_string(bad) + " cannot be decoded"), std::string::npos)
      << h.out["bad"].error;
  EXPECT_EQ(h.out["good"].reason, "length");
  EXPECT_EQ(h.out["good"].ids, h.greedy(good_prompt, 6));
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);
}

// engine.h invariant 11: in a group, a model step whose communication fails (errc::aborted: the group's
// communicator was aborted because a member was lost) is undone: nothing of it is sent, the batch runs
// again at the next step and the output is the same; a failure of another kind ends it with "error".
class failing_executor final : public local_executor {
 public:
  failing_executor(const parallel::decoder& d, int64_t blocks, int64_t bs, std::vector<int> fail_at, runtime::errc code)
      : local_executor(d, blocks, bs), fail_at_(std::move(fail_at)), code_(code) {}
  runtime::tensor execute(std::span<const parallel::forward_batch_seq> seqs) override {
    ++calls_;
    if (std::find(fail_at_.begin(), fail_at_.end(), calls_) != fail_at_.end())
      TROUPE_THROW(code_, "the group's communicator failed in call {}", calls_);
    return local_executor::execute(seqs);
  }

 private:
  std::vector<int> fail_at_;
  runtime::errc code_;
  int calls_ = 0;
};

TEST(Engine, AGroupStepAbortedMidwayIsUndoneAndRunsAgainWithTheSameOutput) {
  engine_options o;
  o.block_size = 4;
  o.max_batch_tokens = 16;  // chunked prefill: the first failure is mid-prompt
  o.group_member = true;
  harness h("mixtral_moe", o);
  const int64_t V = h.dec->config().vocab_size;
  failing_executor ex(*h.dec, 64, o.block_size, {2, 7, 8}, runtime::errc::aborted);
  h.eng = std::make_unique<engine>(ex, *h.tok, o);
  const std::vector<std::vector<int32_t>> prompts = {prompt_of(21, 1, V), prompt_of(9, 2, V), prompt_of(14, 3, V)};
  for (size_t i = 0; i < prompts.size(); ++i) h.submit("r" + std::to_string(i), prompts[i], greedy_params(8), i == 1 ? 2 : 1);
  int aborted = 0;
  for (int i = 0; i < 200 && (h.eng->stats().running > 0 || h.eng->stats().waiting > 0 || i == 0); ++i) {
    try {
      h.eng->step();
    } catch (const runtime::error& e) {
      EXPECT_EQ(e.code(), runtime::errc::aborted) << e.what();
      ++aborted;
    }
  }
  EXPECT_EQ(aborted, 3);
  for (const std::string key : {"r0", "r1#0", "r1#1", "r2"}) {
    const auto& c = h.out[key];
    const size_t i = static_cast<size_t>(key[1] - '0');
    EXPECT_EQ(c.finished, 1) << key;
    EXPECT_EQ(c.reason, "length") << key << ": " << c.error;
    EXPECT_EQ(c.ids, h.greedy(prompts[i], 8)) << key;
  }
  EXPECT_EQ(h.eng->stats().kv.blocks_used, 0);

  harness g("mixtral_moe", o);  // a failure that is not the communication's ends the batch
  failing_executor bad(*g.dec, 64, o.block_size, {1}, runtime::errc::internal);
  g.eng = std::make_unique<engine>(bad, *g.tok, o);
  g.submit("x", prompts[1], greedy_params(4));
  EXPECT_THROW(g.eng->step(), runtime::error);
  EXPECT_EQ(g.out["x"].reason, "error");
  EXPECT_EQ(g.out["x"].finished, 1);
}

// A moved sample's latencies go on from where they were (engine.h invariant 10): the gap to its next
// token counts from the last token its client got, and one moved before its first token counts its
// TTFT from its arrival at the first rank.
TEST(Engine, AResumedSampleKeepsTheLatenciesItHadBeforeTheMove) {
  engine_options o = small_cache();
  harness h("llama_gqa", o);
  const int64_t V = h.dec->config().vocab_size;
  const auto prompt = prompt_of(9, 5, V);
  const auto plain = h.greedy(prompt, 6);
  auto run = [&](const std::string& id, std::vector<int32_t> sent, std::chrono::milliseconds since_arrival,
                 std::chrono::milliseconds since_last_token) {
    engine_request::resumed from;
    from.tokens = std::move(sent);
    from.last_token_age = since_last_token;
    const auto events = run_logged(h, id, prompt, greedy_params(6), from, since_arrival);
    ASSERT_TRUE(!events.empty() && events.back().finished) << id;
  };
  const auto ttft0 = h.eng->ttft_histogram(), tpot0 = h.eng->tpot_histogram();
  run("after3", {plain[0], plain[1], plain[2]}, std::chrono::milliseconds(5000), std::chrono::milliseconds(2000));
  const auto ttft1 = h.eng->ttft_histogram(), tpot1 = h.eng->tpot_histogram();
  EXPECT_EQ(ttft1.n, ttft0.n) << "its first token went out before the move";
  EXPECT_EQ(tpot1.n - tpot0.n, 3) << "tokens 4, 5 and 6";
  EXPECT_GE(tpot1.sum - tpot0.sum, 2.0) << "the gap across the move counts from the client's last token";
  run("before1", {}, std::chrono::milliseconds(1500), std::chrono::milliseconds(0));
  const auto ttft2 = h.eng->ttft_histogram();
  EXPECT_EQ(ttft2.n - ttft1.n, 1);
  EXPECT_GE(ttft2.sum - ttft1.sum, 1.5) << "its TTFT counts from its arrival, not from the move";
}

}  // namespace
