// Serving across an expert-parallel group (parallel/ep/ep_serve_runner.h, elastic/engine/executor.h)
// on in-process ranks, each holding only its experts' weights:
//   * forward_batch through the group's MoE layers = one rank's forward_batch: logits bitwise on the
//     Mixtral fixture (no shared expert) with 2 and 4 ranks (slices of 8/7 and 4/4/4/3 rows), and
//     a one-token decode step that leaves the other ranks' slices empty, and within 1e-6 on Qwen2-MoE (its shared expert's dense MLP is not
//     batch invariant); every rank counts the same per-expert rows as one rank does.
//   * the engine on rank 0 over a group_executor with follow_group on the other ranks: batched greedy
//     requests equal generate_greedy token for token, the followers run exactly the engine's
//     iterations and return when it stops, and /metrics reports the ranks and per-expert loads whose
//     sum is top_k rows per computed token per MoE layer.
//   * a rank that dies mid-serving (its communicator aborted): every running request ends with
//     finish reason "error" naming the communicator's failure, none hangs, and the executor is
//     broken: a later request fails at once; a batch the model refuses never leaves rank 0.
//   * a placement switch between two steps (group_hooks: rank 0 asks after step 2, every rank
//     moves its experts with ep_migrate at the same point): greedy output still = generate_greedy,
//     every rank ran after_step for the same steps and the experts live on their new ranks.
//   * an idle group outlives its communicator's timeout (1 s) through the scheduler actor's
//     keepalives (every 100 ms): a request after 2.5 s idle is served and equals generate_greedy.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "actors/serve_scheduler.h"
#include "elastic/engine/engine.h"
#include "elastic/engine/executor.h"
#include "parallel/ep/ep_serve_runner.h"
#include "parallel/ep/ep_shard.h"
#include "parallel/model/forward_batch.h"
#include "parallel/model/generate.h"
#include "parallel/model/model_weights.h"
#include "runtime/communicator.h"
#include "serve_group_util.h"

namespace {

using namespace troupe;
using namespace troupe_test;
using parallel::forward_batch_seq;
using parallel::ep::ep_context;
using parallel::ep::ep_placement;
using parallel::ep::ep_serve_runner;

// Two steps on a store of 8 blocks of 4: prefill of three sequences (9, 5 and 1 tokens), then one
// decode token of sequence 0 alone. Returns the logits of both steps, concatenated.
struct two_steps {
  std::vector<float> logits;
  std::map<int64_t, std::vector<int64_t>> loads;
};

two_steps run_steps(const parallel::decoder& dec, parallel::paged_kv_store& kv, bool logits) {
  const int64_t V = dec.config().vocab_size;
  const auto a = ids(9, 1, V), b = ids(5, 2, V), c = ids(1, 3, V), d = ids(1, 4, V);
  const std::vector<int32_t> ta = {5, 1, 6}, tb = {0, 7}, tc = {3};
  std::vector<forward_batch_seq> s1 = {{a, 0, ta}, {b, 0, tb}, {c, 0, tc}};
  std::vector<forward_batch_seq> s2 = {{d, 9, ta}};
  parallel::forward_batch_options o;
  o.no_logits = !logits;
  two_steps r;
  for (const auto* s : {&s1, &s2}) {
    const runtime::tensor lg = parallel::forward_batch(dec, *s, kv, o);
    if (logits) r.logits.insert(r.logits.end(), lg.data<float>(), lg.data<float>() + lg.numel());
  }
  return r;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void group_matches_one_rank(const std::string& model, int P, double tol) {
  const parallel::model_weights full = parallel::model_weights::load(fixture(model));
  two_steps want;
  {
    parallel::decoder dec(full);
    ep_serve_runner counter;
    dec.set_expert_parallel(&counter);
    parallel::paged_kv_store kv(full.config(), 8, 4);
    want = run_steps(dec, kv, true);
    want.loads = counter.expert_loads();
  }
  auto tok = runtime::make_inproc_group(P, 20000);
  auto wts = runtime::make_inproc_group(P, 20000);
  std::vector<two_steps> got(static_cast<size_t>(P));
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m(model, r, P, tok[rr].get(), wts[rr].get());
    parallel::paged_kv_store kv(m.w.config(), 8, 4);
    got[rr] = run_steps(*m.dec, kv, true);
    got[rr].loads = m.runner->expert_loads();
  });
  for (int r = 0; r < P; ++r) {
    const auto rr = static_cast<size_t>(r);
    ASSERT_EQ(errors[rr], "") << "rank " << r;
    ASSERT_EQ(got[rr].logits.size(), want.logits.size());
    if (tol == 0) EXPECT_EQ(got[rr].logits, want.logits) << model << " rank " << r << " of " << P;
    else EXPECT_LE(rel_err(got[rr].logits, want.logits), tol) << model << " rank " << r;
    EXPECT_EQ(got[rr].loads, want.loads) << "rank " << r;
  }
  // 16 tokens, top_k rows each, in every MoE layer.
  const auto& c = full.config();
  int64_t moe_layers = 0;
  for (const auto& L : full.layers) moe_layers += L.is_moe ? 1 : 0;
  int64_t rows = 0;
  for (const auto& [l, v] : want.loads)
    for (int64_t x : v) rows += x;
  EXPECT_EQ(static_cast<int64_t>(want.loads.size()), moe_layers);
  EXPECT_EQ(rows, 16 * c.top_k * moe_layers);
}

TEST(ServeGroup, MixtralOnTwoRanksIsBitwiseOneRank) { group_matches_one_rank("mixtral_moe", 2, 0); }
TEST(ServeGroup, MixtralOnFourRanksIsBitwiseOneRank) { group_matches_one_rank("mixtral_moe", 4, 0); }
TEST(ServeGroup, Qwen2MoeWithSharedExpertWithinTolerance) { group_matches_one_rank("qwen2_moe", 2, 1e-6); }

TEST(ServeGroup, BackwardIsRefused) {
  ep_serve_runner r;
  parallel::layer_params L, G;
  runtime::model_config c;
  EXPECT_THROW(r.backward(0, nullptr, G, nullptr, nullptr, L, c, 1), runtime::error);
}

// The engine on rank 0, the other ranks following: greedy = generate_greedy per request.
TEST(ServeGroup, EngineOverTwoRanksEqualsGenerateGreedy) {
  const int P = 2;
  const std::string dir = fixture("mixtral_moe");
  const parallel::model_weights full = parallel::model_weights::load(dir);
  const int64_t V = full.config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {ids(11, 1, V), ids(4, 2, V), ids(23, 3, V), ids(11, 1, V)};
  const int64_t n_new = 7;
  std::vector<std::vector<int32_t>> want;
  {
    parallel::decoder dec(full);
    for (const auto& p : prompts) want.push_back(greedy_tail(dec, p, n_new));
  }
  auto tok = runtime::make_inproc_group(P, 30000);
  auto wts = runtime::make_inproc_group(P, 30000);
  std::map<std::string, std::vector<int32_t>> out;
  std::map<std::string, int> finished;
  std::mutex mu;
  std::string metrics;
  int64_t iterations = 0, followed = -1, computed_tokens = 0;
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), wts[rr].get());
    // Rank 1 could afford more blocks: the group takes the minimum (12 blocks of 4 tokens:
    // fewer than the four requests need at once, so the engine preempts).
    const int64_t blocks = r == 0 ? 12 : 40;
    if (r != 0) {
      followed = elastic::follow_group(*m.dec, blocks, 4, *tok[rr]);
      return;
    }
    elastic::group_executor ex(*m.dec, blocks, 4, *tok[rr]);
    EXPECT_EQ(ex.num_blocks(), 12);
    // A batch the model refuses never leaves rank 0 (the follower's step count below proves it).
    const std::vector<int32_t> bad_ids = {1, 100000}, table = {0};
    const parallel::forward_batch_seq bad[] = {{bad_ids, 0, table}};
    EXPECT_THROW(ex.execute(bad), runtime::error);
    EXPECT_FALSE(ex.broken());
    auto tk = parallel::load_tokenizer(dir);
    elastic::engine_options o;
    o.max_batch_tokens = 16;  // chunked prefill of the 23-token prompt
    elastic::engine eng(ex, *tk, o);
    EXPECT_EQ(eng.ranks(), 2);
    for (size_t i = 0; i < prompts.size(); ++i) {
      elastic::engine_request q;
      q.id = "r" + std::to_string(i);
      q.prompt = prompts[i];
      q.params.temperature = 0;
      q.params.max_tokens = n_new;
      q.params.ignore_eos = true;
      q.on_event = [&, id = q.id](const elastic::engine_event& e) {
        std::lock_guard<std::mutex> g(mu);
        out[id].insert(out[id].end(), e.token_ids.begin(), e.token_ids.end());
        if (e.finished) ++finished[id];
      };
      eng.submit(std::move(q));
    }
    eng.start();
    for (int spin = 0; spin < 3000; ++spin) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (finished.size() == prompts.size()) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    metrics = eng.metrics_text();
    eng.stop();  // ends the group: rank 1 returns
    iterations = eng.stats().iterations;
    computed_tokens = eng.stats().model_tokens;
    EXPECT_GT(eng.stats().preemptions, 0);
  });
  for (int r = 0; r < P; ++r) ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_EQ(finished[id], 1) << id;
    EXPECT_EQ(out[id], want[i]) << id;
  }
  EXPECT_EQ(followed, iterations);
  EXPECT_NE(metrics.find("troupe_engine_ranks 2\n"), std::string::npos) << metrics;
  // Per-expert rows: top_k per token the model computed, in every MoE layer.
  int64_t rows = 0;
  size_t pos = 0;
  const std::string key = "troupe_expert_load_rows_total{";
  while ((pos = metrics.find(key, pos)) != std::string::npos) {
    const size_t sp = metrics.find("} ", pos);
    rows += std::stoll(metrics.substr(sp + 2));
    pos = sp;
  }
  int64_t moe_layers = 0;
  for (const auto& L : full.layers) moe_layers += L.is_moe ? 1 : 0;
  EXPECT_GT(computed_tokens, 0);
  EXPECT_EQ(rows, computed_tokens * full.config().top_k * moe_layers);
  EXPECT_NE(metrics.find("troupe_expert_rank_max_over_mean "), std::string::npos);
}

TEST(ServeGroup, IdleGroupOutlivesTheTimeoutThroughKeepalives) {
  const int P = 2;
  const std::string dir = fixture("mixtral_moe");
  const parallel::model_weights full = parallel::model_weights::load(dir);
  const std::vector<int32_t> prompt = ids(9, 5, full.config().vocab_size);
  std::vector<int32_t> want;
  {
    parallel::decoder dec(full);
    want = greedy_tail(dec, prompt, 5);
  }
  auto tok = runtime::make_inproc_group(P, 1000);
  std::vector<int32_t> got;
  std::string reason;
  std::mutex mu;
  const auto errors = run_ranks(P, tok, nullptr, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), nullptr);
    if (r != 0) {
      elastic::follow_group(*m.dec, 16, 4, *tok[rr]);
      return;
    }
    elastic::group_executor ex(*m.dec, 16, 4, *tok[rr]);
    auto tk = parallel::load_tokenizer(dir);
    elastic::engine_options o;
    o.keepalive_ms = 100;
    elastic::engine eng(ex, *tk, o);
    caf::actor_system_config cfg;
    caf::actor_system sys{cfg};
    actors::serve_scheduler_client sched(sys, eng);
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    elastic::engine_request q;
    q.id = "late";
    q.prompt = prompt;
    q.params.temperature = 0;
    q.params.max_tokens = 5;
    q.params.ignore_eos = true;
    q.on_event = [&](const elastic::engine_event& e) {
      std::lock_guard<std::mutex> g(mu);
      got.insert(got.end(), e.token_ids.begin(), e.token_ids.end());
      if (e.finished) reason = e.finish_reason;
    };
    sched.submit(std::move(q));
    for (int i = 0; i < 1000; ++i) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (!reason.empty()) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    sched.stop();
  });
  for (int r = 0; r < P; ++r) ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_EQ(reason, "length");
  EXPECT_EQ(got, want);
}

TEST(ServeGroup, ARankLostMidServingEndsTheRunningRequestsWithAnError) {
  const int P = 2;
  const std::string dir = fixture("mixtral_moe");
  auto tok = runtime::make_inproc_group(P, 500);
  std::map<std::string, std::string> reason, error;
  std::mutex mu;
  std::string follower_error;
  const auto errors = run_ranks(P, tok, nullptr, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), nullptr);
    if (r != 0) {
      try {
        elastic::follow_group(*m.dec, 64, 4, *tok[rr]);
      } catch (const runtime::error& e) {
        follower_error = e.what();
      }
      return;
    }
    elastic::group_executor ex(*m.dec, 64, 4, *tok[rr]);
    auto tk = parallel::load_tokenizer(dir);
    elastic::engine eng(ex, *tk, {});
    for (int i = 0; i < 3; ++i) {
      elastic::engine_request q;
      q.id = "r" + std::to_string(i);
      q.prompt = ids(5 + i, i, m.w.config().vocab_size);
      q.params.temperature = 0;
      q.params.max_tokens = 200;
      q.params.ignore_eos = true;
      q.on_event = [&, id = q.id](const elastic::engine_event& e) {
        std::lock_guard<std::mutex> g(mu);
        if (e.finished) reason[id] = e.finish_reason, error[id] = e.error;
      };
      eng.submit(std::move(q));
    }
    for (int i = 0; i < 3 && eng.step(); ++i) {
    }
    tok[1]->abort("rank 1 died");  // rank 1 leaves between two iterations
    for (int i = 0; i < 10 && eng.step(); ++i) {
    }
    // Broken from now on: a new request fails at once, without waiting on the group.
    EXPECT_TRUE(ex.broken());
    elastic::engine_request q;
    q.id = "after";
    q.prompt = ids(4, 9, m.w.config().vocab_size);
    q.on_event = [&](const elastic::engine_event& e) {
      std::lock_guard<std::mutex> g(mu);
      if (e.finished) reason["after"] = e.finish_reason, error["after"] = e.error;
    };
    eng.submit(std::move(q));
    eng.step();
  });
  EXPECT_EQ(reason["after"], "error");
  EXPECT_NE(error["after"].find("broken since an earlier step"), std::string::npos) << error["after"];
  ASSERT_EQ(errors[0], "");
  EXPECT_NE(follower_error.find("rank 1 died"), std::string::npos) << follower_error;
  for (int i = 0; i < 3; ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_EQ(reason[id], "error") << id;
    EXPECT_NE(error[id].find("broadcast"), std::string::npos) << id << ": " << error[id];
  }
}

TEST(ServeGroup, APlacementSwitchBetweenStepsKeepsGreedyOutput) {
  const int P = 2;
  const std::string dir = fixture("mixtral_moe");
  const parallel::model_weights full = parallel::model_weights::load(dir);
  const int64_t V = full.config().vocab_size, E = full.config().n_experts;
  const std::vector<std::vector<int32_t>> prompts = {ids(9, 1, V), ids(5, 2, V)};
  std::vector<std::vector<int32_t>> want;
  {
    parallel::decoder dec(full);
    for (const auto& p : prompts) want.push_back(greedy_tail(dec, p, 8));
  }
  ep_placement swapped;  // rank 0 gets the upper half of the experts, rank 1 the lower
  swapped.ranks = P;
  for (int64_t e = 0; e < E; ++e) swapped.native.push_back(e < E / 2 ? 1 : 0);
  auto tok = runtime::make_inproc_group(P, 30000);
  auto wts = runtime::make_inproc_group(P, 30000);
  std::map<std::string, std::vector<int32_t>> out;
  std::mutex mu;
  std::vector<std::vector<int64_t>> seen(P);
  std::vector<int> syncs(P, 0);
  std::vector<std::vector<bool>> holds(P);  // after the run: which experts rank r holds (layer 0)
  const auto errors = run_ranks(P, tok, &wts, [&](int r) {
    const auto rr = static_cast<size_t>(r);
    rank_model m("mixtral_moe", r, P, tok[rr].get(), wts[rr].get());
    const ep_placement from = ep_placement::contiguous(E, P);
    elastic::group_hooks hooks;
    hooks.after_step = [&, rr](int64_t step) { seen[rr].push_back(step); };
    hooks.want_sync = [&] { return seen[0].size() == 3; };  // once, after the third step
    hooks.sync = [&, rr] {
      ++syncs[rr];
      for (size_t l = 0; l < m.w.layers.size(); ++l) {
        if (!m.w.layers[l].is_moe) continue;
        parallel::ep::ep_migrate(parallel::ep::ep_expert_sets(m.w.layers[l], m.w.config()), from, swapped,
                                 *tok[rr]);
        m.runner->group()->set_placement(static_cast<int64_t>(l), swapped);
      }
    };
    if (r != 0) {
      elastic::follow_group(*m.dec, 64, 4, *tok[rr], hooks);
    } else {
      elastic::group_executor ex(*m.dec, 64, 4, *tok[rr], hooks);
      auto tk = parallel::load_tokenizer(dir);
      elastic::engine eng(ex, *tk, {});
      for (size_t i = 0; i < prompts.size(); ++i) {
        elastic::engine_request q;
        q.id = "r" + std::to_string(i);
        q.prompt = prompts[i];
        q.params.temperature = 0;
        q.params.max_tokens = 8;
        q.params.ignore_eos = true;
        q.on_event = [&, id = q.id](const elastic::engine_event& e) {
          std::lock_guard<std::mutex> g(mu);
          out[id].insert(out[id].end(), e.token_ids.begin(), e.token_ids.end());
        };
        eng.submit(std::move(q));
      }
      while (eng.step()) {
      }
      ex.finish();
    }
    for (int64_t e = 0; e < E; ++e) holds[rr].push_back(m.w.layers[0].expert_gate.size() > static_cast<size_t>(e) &&
                                                       m.w.layers[0].expert_gate[static_cast<size_t>(e)].defined());
  });
  for (int r = 0; r < P; ++r) ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(out["r" + std::to_string(i)], want[i]) << i;
  EXPECT_EQ(syncs[0], 1);
  EXPECT_EQ(syncs[1], 1);
  EXPECT_GT(seen[0].size(), 3u);
  EXPECT_EQ(seen[0], seen[1]);
  for (int64_t e = 0; e < E; ++e) {
    EXPECT_EQ(holds[0][static_cast<size_t>(e)], e >= E / 2) << "expert " << e;
    EXPECT_EQ(holds[1][static_cast<size_t>(e)], e < E / 2) << "expert " << e;
  }
}

}  // namespace
