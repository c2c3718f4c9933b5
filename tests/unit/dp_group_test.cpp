// A data-parallel-attention serving group (elastic/scale/dp_group.h) on in-process ranks, each with
// its own engine and KV cache and only its experts' weights (ep_serve_runner, data_parallel layout):
//   * greedy output of every request equals generate_greedy whichever rank serves it: Mixtral on 2
//     and 4 ranks (round robin and least_kv_prefix dispatch), Qwen2-MoE on 2, a dense Llama on 2;
//   * ranks with no requests take part in every MoE layer (all requests sent to one rank);
//   * samples and logprobs travel back from a remote rank intact (equal to the same request on rank 0);
//   * an abort reaches the rank that serves the request and frees its blocks there;
//   * an idle group does not iterate (driven by the scheduler actor), and a request after idling is
//     served;
//   * a batch one rank's model refuses ends alone (the rank still joins the iteration's MoE layers,
//     the other ranks' requests are unaffected); a failure inside a step breaks the group at once
//     (the communicator is aborted, not timed out); a rank that dies breaks the group: its requests
//     end with "error", later iterations throw;
//   * the least_kv_prefix policy: prefix affinity within the slack, else the least loaded rank.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>

#include "actors/serve_scheduler.h"
#include "elastic/engine/engine.h"
#include "elastic/engine/executor.h"
#include "elastic/scale/dp_group.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/model/forward_batch.h"
#include "serve_group_util.h"

namespace {

using namespace troupe;
using namespace troupe::elastic;
using namespace troupe_test;

// Sends every request to one rank.
class to_rank final : public dp_dispatch_policy {
 public:
  explicit to_rank(int r) : r_(r) {}
  int pick(std::span<const int32_t>, std::span<const dp_rank_load>) override { return r_; }
  void dispatched(int, std::span<const int32_t>) override {}
  std::string name() const override { return "to_rank"; }
  void resize(int) override {}
  void remove(int) override {}

 private:
  int r_;
};

struct result {
  std::map<std::string, std::vector<int32_t>> ids;
  std::map<std::string, std::string> text, reason, error;
  std::map<std::string, std::vector<token_logprob>> logprobs;
  std::vector<int64_t> dispatched;
};

struct request_spec {
  std::string id;
  std::vector<int32_t> prompt;
  sampling_params params;
  int64_t n = 1;
};

// Runs a P-rank group over `model`: rank 0 submits `reqs` with `policy` and steps until every sample
// finished. An empty `model_layout` model is dense (no expert-parallel runner).
result run_group(const std::string& model, int P, std::function<std::unique_ptr<dp_dispatch_policy>()> policy,
                 const std::vector<request_spec>& reqs, const std::function<void(dp_leader&, int step)>& each = {}) {
  auto tok = runtime::make_inproc_group(P, 30000);
  auto wts = runtime::make_inproc_group(P, 30000);
  result out;
  std::mutex mu;
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    const parallel::model_weights probe = parallel::model_weights::load(fixture(model));
    std::unique_ptr<rank_model> moe;
    std::unique_ptr<parallel::model_weights> dense_w;
    std::unique_ptr<parallel::decoder> dense;
    if (probe.config().is_moe()) {
      moe = std::make_unique<rank_model>(model, r, P, tok[rr].get(), wts[rr].get(), ep_serve_layout::data_parallel);
    } else {
      dense_w = std::make_unique<parallel::model_weights>(parallel::model_weights::load(fixture(model)));
      dense = std::make_unique<parallel::decoder>(*dense_w);
    }
    const parallel::decoder& dec = moe ? *moe->dec : *dense;
    const int64_t blocks = agree_num_blocks(*tok[rr], 40 + 8 * r);  // the group's minimum: 40
    local_executor exec(dec, blocks, 4);
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.max_batch_tokens = 16;  // chunked prefill
    o.group_member = true;
    engine eng(exec, bt, o);
    if (r != 0) {
      dp_follow(eng, *tok[rr]);
      return;
    }
    dp_leader lead(eng, *tok[rr], policy());
    int64_t open = 0;
    for (const auto& q : reqs) {
      engine_request e;
      e.id = q.id;
      e.prompt = q.prompt;
      e.params = q.params;
      e.n = q.n;
      open += q.n;
      e.on_event = [&, id = q.id, n = q.n](const engine_event& ev) {
        std::lock_guard<std::mutex> g(mu);
        const std::string key = n == 1 ? id : id + "#" + std::to_string(ev.index);
        auto& v = out.ids[key];
        v.insert(v.end(), ev.token_ids.begin(), ev.token_ids.end());
        out.text[key] += ev.text;
        auto& l = out.logprobs[key];
        l.insert(l.end(), ev.logprobs.begin(), ev.logprobs.end());
        if (ev.finished) {
          out.reason[key] = ev.finish_reason;
          out.error[key] = ev.error;
          --open;
        }
      };
      lead.submit(std::move(e));
    }
    for (int step = 0; step < 2000; ++step) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (open == 0) break;
      }
      if (each) each(lead, step);
      lead.step();
    }
    out.dispatched = lead.dispatched();
    lead.shutdown();
  });
  for (int r = 0; r < P; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  return out;
}

std::vector<request_spec> greedy_requests(int64_t V, int64_t n_new) {
  std::vector<request_spec> reqs;
  const std::vector<int64_t> lens = {11, 4, 23, 11, 7, 30};
  for (size_t i = 0; i < lens.size(); ++i) {
    request_spec q;
    q.id = "r" + std::to_string(i);
    q.prompt = ids(lens[i], static_cast<int32_t>(i % 4 + 1), V);  // r0 and r4 ... share prompts
    q.params.temperature = 0;
    q.params.max_tokens = n_new;
    q.params.ignore_eos = true;
    reqs.push_back(q);
  }
  return reqs;
}

void expect_greedy(const std::string& model, int P, std::function<std::unique_ptr<dp_dispatch_policy>()> policy) {
  const parallel::model_weights full = parallel::model_weights::load(fixture(model));
  parallel::decoder dec(full);
  const auto reqs = greedy_requests(full.config().vocab_size, 7);
  const result got = run_group(model, P, policy, reqs);
  for (const auto& q : reqs) {
    EXPECT_EQ(got.ids.at(q.id), greedy_tail(dec, q.prompt, 7)) << model << " on " << P << " ranks, " << q.id;
    EXPECT_EQ(got.reason.at(q.id), "length");
  }
  int64_t sum = 0;
  for (int64_t d : got.dispatched) sum += d;
  EXPECT_EQ(sum, static_cast<int64_t>(reqs.size()));
}

TEST(DpGroup, MixtralOnTwoRanksEqualsGenerateGreedy) {
  expect_greedy("mixtral_moe", 2, [] { return std::make_unique<dp_round_robin>(2); });
}

TEST(DpGroup, MixtralOnFourRanksWithPrefixDispatchEqualsGenerateGreedy) {
  expect_greedy("mixtral_moe", 4, [] { return std::make_unique<dp_least_kv_prefix>(4, 4); });
}

TEST(DpGroup, Qwen2MoeWithSharedExpertEqualsGenerateGreedy) {
  expect_greedy("qwen2_moe", 2, [] { return std::make_unique<dp_round_robin>(2); });
}

TEST(DpGroup, DenseModelRanksAreReplicas) {
  expect_greedy("llama_gqa", 2, [] { return std::make_unique<dp_round_robin>(2); });
}

TEST(DpGroup, RanksWithoutRequestsStillJoinEveryMoeLayer) {
  const parallel::model_weights full = parallel::model_weights::load(fixture("mixtral_moe"));
  parallel::decoder dec(full);
  const auto reqs = greedy_requests(full.config().vocab_size, 5);
  const result got = run_group("mixtral_moe", 4, [] { return std::make_unique<to_rank>(1); }, reqs);
  EXPECT_EQ(got.dispatched, (std::vector<int64_t>{0, static_cast<int64_t>(reqs.size()), 0, 0}));
  for (const auto& q : reqs) EXPECT_EQ(got.ids.at(q.id), greedy_tail(dec, q.prompt, 5)) << q.id;
}

TEST(DpGroup, SamplesAndLogprobsComeBackFromARemoteRankIntact) {
  const auto V = parallel::model_weights::load(fixture("mixtral_moe")).config().vocab_size;
  request_spec s;
  s.id = "s";
  s.prompt = ids(9, 2, V);
  s.params.temperature = 0.9;
  s.params.seed = 5;
  s.params.max_tokens = 6;
  s.params.ignore_eos = true;
  s.params.logprobs = 2;
  s.n = 3;
  // The same request served on rank 0 and on rank 1: the same tokens and logprobs.
  const result local = run_group("mixtral_moe", 2, [] { return std::make_unique<to_rank>(0); }, {s});
  const result remote = run_group("mixtral_moe", 2, [] { return std::make_unique<to_rank>(1); }, {s});
  for (int i = 0; i < 3; ++i) {
    const std::string k = "s#" + std::to_string(i);
    ASSERT_EQ(remote.ids.at(k).size(), 6u) << k;
    EXPECT_EQ(remote.ids.at(k), local.ids.at(k)) << k;
    EXPECT_EQ(remote.text.at(k), local.text.at(k)) << k;
    ASSERT_EQ(remote.logprobs.at(k).size(), 6u);
    for (size_t t = 0; t < 6; ++t) {
      EXPECT_EQ(remote.logprobs.at(k)[t].logprob, local.logprobs.at(k)[t].logprob);
      EXPECT_EQ(remote.logprobs.at(k)[t].top, local.logprobs.at(k)[t].top);
    }
  }
  EXPECT_NE(remote.ids.at("s#0"), remote.ids.at("s#1"));
}

TEST(DpGroup, AnAbortReachesTheServingRankAndFreesItsBlocks) {
  const auto V = parallel::model_weights::load(fixture("mixtral_moe")).config().vocab_size;
  request_spec q;
  q.id = "long";
  q.prompt = ids(9, 3, V);
  q.params.temperature = 0;
  q.params.max_tokens = 100;
  q.params.ignore_eos = true;
  int64_t used_before_abort = -1;
  const result got = run_group("mixtral_moe", 2, [] { return std::make_unique<to_rank>(1); }, {q},
                               [&](dp_leader& lead, int step) {
                                 if (step == 4) {
                                   used_before_abort = lead.loads()[1].blocks_used;
                                   lead.abort("long");
                                 }
                               });
  EXPECT_EQ(got.reason.at("long"), "abort");
  EXPECT_LT(got.ids.at("long").size(), 100u);
  EXPECT_GT(used_before_abort, 0);
}

TEST(DpGroup, AnIdleGroupDoesNotIterateAndServesAfterIdling) {
  const int P = 2;
  auto tok = runtime::make_inproc_group(P, 30000);
  auto wts = runtime::make_inproc_group(P, 30000);
  const parallel::model_weights full = parallel::model_weights::load(fixture("mixtral_moe"));
  parallel::decoder ref(full);
  const auto prompt = ids(8, 1, full.config().vocab_size);
  std::atomic<int64_t> follower_steps{0};
  std::vector<int64_t> idle_counts;
  std::vector<int32_t> got;
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), wts[rr].get(), ep_serve_layout::data_parallel);
    local_executor exec(*m.dec, agree_num_blocks(*tok[rr], 32), 4);
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.keepalive_ms = 100;
    o.group_member = true;
    engine eng(exec, bt, o);
    group_hooks hooks;
    hooks.after_step = [&](int64_t) { ++follower_steps; };
    if (r != 0) {
      dp_follow(eng, *tok[rr], hooks);
      return;
    }
    dp_leader lead(eng, *tok[rr], std::make_unique<to_rank>(1));
    caf::actor_system_config cfg;
    caf::actor_system sys(cfg);
    actors::serve_scheduler_client sched(sys, lead);
    auto run_one = [&](const std::string& id) {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      std::vector<int32_t> toks;
      engine_request e;
      e.id = id;
      e.prompt = prompt;
      e.params.temperature = 0;
      e.params.max_tokens = 6;
      e.params.ignore_eos = true;
      e.on_event = [&](const engine_event& ev) {
        std::lock_guard<std::mutex> g(mu);
        toks.insert(toks.end(), ev.token_ids.begin(), ev.token_ids.end());
        if (ev.finished) done = true;
        cv.notify_all();
      };
      sched.submit(std::move(e));
      std::unique_lock<std::mutex> lock(mu);
      cv.wait_for(lock, std::chrono::seconds(30), [&] { return done; });
      return toks;
    };
    got = run_one("a");
    idle_counts.push_back(follower_steps.load());
    std::this_thread::sleep_for(std::chrono::milliseconds(600));  // six keepalive periods
    idle_counts.push_back(follower_steps.load());
    const auto again = run_one("b");
    EXPECT_EQ(again, got);
    sched.stop();
  });
  for (int r = 0; r < P; ++r) ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_EQ(got, greedy_tail(ref, prompt, 6));
  ASSERT_EQ(idle_counts.size(), 2u);
  EXPECT_EQ(idle_counts[0], idle_counts[1]) << "the group iterated while idle";
}

TEST(DpGroup, ALostRankBreaksTheGroupAndItsRequestsEndWithError) {
  const int P = 2;
  auto tok = runtime::make_inproc_group(P, 5000);
  auto wts = runtime::make_inproc_group(P, 5000);
  const auto V = parallel::model_weights::load(fixture("mixtral_moe")).config().vocab_size;
  std::string reason, error, later;
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), wts[rr].get(), ep_serve_layout::data_parallel);
    local_executor exec(*m.dec, agree_num_blocks(*tok[rr], 32), 4);
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.group_member = true;
    engine eng(exec, bt, o);
    if (r != 0) {
      // Serve two iterations, then die: the communicator aborts (what a killed process looks like).
      group_hooks hooks;
      hooks.after_step = [&](int64_t step) {
        if (step == 1) throw std::runtime_error("rank 1 is gone");
      };
      dp_follow(eng, *tok[rr], hooks);
      return;
    }
    dp_leader lead(eng, *tok[rr], std::make_unique<to_rank>(1));
    engine_request e;
    e.id = "x";
    e.prompt = ids(6, 1, V);
    e.params.temperature = 0;
    e.params.max_tokens = 50;
    e.params.ignore_eos = true;
    e.on_event = [&](const engine_event& ev) {
      if (ev.finished) {
        reason = ev.finish_reason;
        error = ev.error;
      }
    };
    lead.submit(std::move(e));
    try {
      for (int i = 0; i < 10; ++i) lead.step();
    } catch (const std::exception&) {
    }
    EXPECT_TRUE(lead.broken());
    try {
      lead.step();
    } catch (const runtime::error& err) {
      later = err.message();
    }
    lead.shutdown();
  });
  EXPECT_EQ(errors[1], "rank 1 is gone");
  EXPECT_EQ(reason, "error");
  EXPECT_FALSE(error.empty());
  EXPECT_NE(later.find("broken"), std::string::npos) << later;
}

// A rank's executor that refuses its n-th batch (check) or fails inside its n-th step (execute).
class flaky_executor final : public local_executor {
 public:
  flaky_executor(const parallel::decoder& dec, int64_t blocks, int refuse_at, int fail_at)
      : local_executor(dec, blocks, 4), refuse_at_(refuse_at), fail_at_(fail_at) {}
  void check(std::span<const parallel::forward_batch_seq> seqs) const override {
    if (++checks_ == refuse_at_) throw runtime::error(runtime::errc::invalid_argument, "a batch the model refuses");
    local_executor::check(seqs);
  }
  runtime::tensor execute(std::span<const parallel::forward_batch_seq> seqs) override {
    if (++runs_ == fail_at_) throw runtime::error(runtime::errc::io, "the step failed halfway");
    return local_executor::execute(seqs);
  }

 private:
  int refuse_at_, fail_at_;
  mutable int checks_ = 0;
  int runs_ = 0;
};

// Rank 1 serves "bad" (refused or failing per `refuse_at` / `fail_at` on its executor), rank 0 "good".
struct flaky_outcome {
  std::map<std::string, std::vector<int32_t>> ids;
  std::map<std::string, std::string> reason;
  std::vector<std::string> errors;
  bool broken = false;
};

flaky_outcome run_flaky(int refuse_at, int fail_at) {
  const int P = 2;
  auto tok = runtime::make_inproc_group(P, 300000);
  auto wts = runtime::make_inproc_group(P, 300000);
  const auto V = parallel::model_weights::load(fixture("mixtral_moe")).config().vocab_size;
  flaky_outcome out;
  std::mutex mu;
  class by_id final : public dp_dispatch_policy {  // "bad" to rank 1, the rest to rank 0
   public:
    int pick(std::span<const int32_t> prompt, std::span<const dp_rank_load>) override { return prompt[0] == 7 ? 1 : 0; }
    void dispatched(int, std::span<const int32_t>) override {}
    std::string name() const override { return "by_id"; }
    void resize(int) override {}
    void remove(int) override {}
  };
  out.errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), wts[rr].get(), ep_serve_layout::data_parallel);
    const int64_t blocks = agree_num_blocks(*tok[rr], 32);
    std::unique_ptr<local_executor> exec = r == 1 ? std::make_unique<flaky_executor>(*m.dec, blocks, refuse_at, fail_at)
                                                  : std::make_unique<local_executor>(*m.dec, blocks, 4);
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.group_member = true;
    engine eng(*exec, bt, o);
    if (r != 0) {
      dp_follow(eng, *tok[rr]);
      return;
    }
    dp_leader lead(eng, *tok[rr], std::make_unique<by_id>());
    int open = 0;
    for (const auto& [id, first] : std::vector<std::pair<std::string, int32_t>>{{"good", 3}, {"bad", 7}}) {
      engine_request e;
      e.id = id;
      e.prompt = ids(6, 2, V);
      e.prompt[0] = first;
      e.params.temperature = 0;
      e.params.max_tokens = 8;
      e.params.ignore_eos = true;
      e.on_event = [&, id = id](const engine_event& ev) {
        std::lock_guard<std::mutex> g(mu);
        auto& v = out.ids[id];
        v.insert(v.end(), ev.token_ids.begin(), ev.token_ids.end());
        if (ev.finished) {
          out.reason[id] = ev.finish_reason;
          --open;
        }
      };
      ++open;
      lead.submit(std::move(e));
    }
    try {
      for (int i = 0; i < 200; ++i) {
        {
          std::lock_guard<std::mutex> g(mu);
          if (open == 0) break;
        }
        lead.step();
      }
    } catch (const std::exception&) {
    }
    out.broken = lead.broken();
    lead.shutdown();
  });
  return out;
}

TEST(DpGroup, ABatchOneRankRefusesEndsAloneAndTheGroupGoesOn) {
  const parallel::model_weights full = parallel::model_weights::load(fixture("mixtral_moe"));
  parallel::decoder dec(full);
  const flaky_outcome got = run_flaky(/*refuse_at=*/2, /*fail_at=*/-1);
  EXPECT_EQ(got.errors, (std::vector<std::string>{"", ""}));
  EXPECT_EQ(got.reason.at("bad"), "error");
  EXPECT_EQ(got.reason.at("good"), "length");
  auto prompt = ids(6, 2, full.config().vocab_size);
  prompt[0] = 3;
  EXPECT_EQ(got.ids.at("good"), greedy_tail(dec, prompt, 8));  // rank 1 still joined every MoE layer
  EXPECT_FALSE(got.broken);
}

TEST(DpGroup, AFailureInsideAStepBreaksTheGroupAtOnce) {
  const auto t0 = std::chrono::steady_clock::now();
  const flaky_outcome got = run_flaky(/*refuse_at=*/-1, /*fail_at=*/2);
  EXPECT_NE(got.errors[1].find("the step failed halfway"), std::string::npos) << got.errors[1];
  EXPECT_TRUE(got.broken);
  EXPECT_EQ(got.reason.at("bad"), "error");
  // rank 0's own request: "error" when its step was in the failed collectives, else "abort" when the
  // group stops; either way it ends
  EXPECT_TRUE(got.reason.at("good") == "error" || got.reason.at("good") == "abort") << got.reason.at("good");
  // The communicator's timeout is 300 s: the group learnt of the failure from the abort, not from it.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(60));
}

TEST(DpDispatch, LeastKvPrefixPrefersAffinityWithinTheSlackElseTheLeastLoaded) {
  dp_least_kv_prefix p(3, /*block_size=*/4, /*slack_blocks=*/10);
  std::vector<dp_rank_load> loads(3);
  loads[0].blocks_used = 5;
  loads[1].blocks_used = 2;
  loads[2].blocks_used = 2;
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9}, b = {9, 9, 9, 9, 1};
  EXPECT_EQ(p.pick(a, loads), 1);  // no history: the least loaded, the lowest rank on a tie
  p.dispatched(0, a);
  EXPECT_EQ(p.prefix_blocks(0, a), 2);
  EXPECT_EQ(p.pick(a, loads), 0);  // rank 0 holds 2 blocks of it and is within the slack
  EXPECT_EQ(p.pick(b, loads), 1);  // another prompt: the least loaded
  loads[0].blocks_used = 13;       // 11 above the least loaded: beyond the slack
  EXPECT_EQ(p.pick(a, loads), 1);
  loads[0].blocks_used = 12;
  loads[0].pending_blocks = 1;  // pending counts as load
  EXPECT_EQ(p.pick(a, loads), 1);
  dp_least_kv_prefix tiny(2, 4, 10, /*max_blocks=*/2);
  tiny.dispatched(1, a);
  tiny.dispatched(1, b);  // remembers only b's block (a's two forgotten first)
  EXPECT_EQ(tiny.prefix_blocks(1, a), 0);
  EXPECT_EQ(tiny.prefix_blocks(1, b), 1);
  EXPECT_THROW(make_dp_dispatch("random", 2, 4), runtime::error);
  EXPECT_EQ(make_dp_dispatch("round_robin", 2, 4)->name(), "round_robin");
}

}  // namespace
