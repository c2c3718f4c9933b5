// The serving scheduler actor (actors/serve_scheduler.h) driving the engine on the Mixtral fixture:
// requests submitted from several threads through serve_scheduler_client come back equal to
// generate_greedy; the engine's refusals come back as the same exceptions (bad input ->
// runtime::error invalid_argument, a full queue -> engine_busy) with nothing queued; an abort of a
// running request ends it with "abort" (made deterministic by holding the actor in the request's
// first event until the abort is sent); stop() ends what is left with "abort" and refuses later
// submits; the actor sleeps when idle (the iteration count does not grow without requests).
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "actors/serve_scheduler.h"
#include "elastic/engine/engine.h"
#include "parallel/model/generate.h"
#include "parallel/model/model_weights.h"
#include "runtime/error.h"

namespace {

using namespace troupe;

// The model, its tokenizer and an actor system; engine options with blocks of 4 tokens.
struct fixture_model {
  parallel::model_weights w;
  std::unique_ptr<parallel::decoder> dec;
  std::unique_ptr<parallel::text_tokenizer> tok;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  fixture_model() {
    const std::string dir = std::string(TROUPE_FIXTURES_DIR) + "/mixtral_moe";
    w = parallel::model_weights::load(dir);
    dec = std::make_unique<parallel::decoder>(w);
    tok = parallel::load_tokenizer(dir);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
  static elastic::engine_options blocks(int64_t n) {
    elastic::engine_options o;
    o.block_size = 4;
    o.num_blocks = n;
    return o;
  }
};

struct sink {
  std::mutex mu;
  std::map<std::string, std::vector<int32_t>> ids;
  std::map<std::string, std::string> reason;
  std::function<void(const std::string&)> on_first;  // on the engine's thread, at a request's first event
  elastic::engine_request make(const std::string& id, std::vector<int32_t> prompt, int64_t n) {
    elastic::engine_request r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.params.temperature = 0;
    r.params.max_tokens = n;
    r.params.ignore_eos = true;
    r.on_event = [this, id](const elastic::engine_event& e) {
      bool first = false;
      {
        std::lock_guard<std::mutex> g(mu);
        first = ids.find(id) == ids.end();
        ids[id].insert(ids[id].end(), e.token_ids.begin(), e.token_ids.end());
        if (e.finished) reason[id] = e.finish_reason;
      }
      if (first && on_first) on_first(id);
    };
    return r;
  }
  bool wait(size_t n, int ms = 30000) {
    for (int i = 0; i < ms / 5; ++i) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (reason.size() >= n) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
};

std::vector<int32_t> prompt_of(int64_t n, int32_t seed) {
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((seed * 37 + i * 11) % 120));
  return p;
}

TEST(ServeScheduler, RequestsFromManyThreadsEqualGenerateGreedy) {
  fixture_model m;
  elastic::engine_options o = fixture_model::blocks(64);
  o.max_batch_tokens = 24;
  elastic::engine eng(*m.dec, *m.tok, o);
  sink s;
  {
    actors::serve_scheduler_client sched(*m.sys, eng);
    std::vector<std::thread> th;
    for (int t = 0; t < 4; ++t)
      th.emplace_back([&, t] {
        for (int k = 0; k < 2; ++k)
          sched.submit(s.make("t" + std::to_string(t) + "k" + std::to_string(k), prompt_of(5 + 3 * t + k, t * 2 + k),
                              6));
      });
    for (auto& t : th) t.join();
    ASSERT_TRUE(s.wait(8));
    const int64_t it = eng.stats().iterations;
    EXPECT_GT(it, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(eng.stats().iterations, it);  // idle: no iteration without work
    sched.stop();
  }
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < 2; ++k) {
      const std::string id = "t" + std::to_string(t) + "k" + std::to_string(k);
      const auto p = prompt_of(5 + 3 * t + k, t * 2 + k);
      parallel::generate_options go;
      go.max_new_tokens = 6;
      const auto r = parallel::generate_greedy(*m.dec, p, 1, static_cast<int64_t>(p.size()), go);
      EXPECT_EQ(s.ids[id], std::vector<int32_t>(r.ids.begin() + static_cast<int64_t>(p.size()), r.ids.end())) << id;
      EXPECT_EQ(s.reason[id], "length") << id;
    }
}

TEST(ServeScheduler, RefusalsComeBackAsTheEnginesExceptions) {
  fixture_model m;
  elastic::engine_options o = fixture_model::blocks(16);
  o.max_waiting = 1;
  elastic::engine eng(*m.dec, *m.tok, o);
  sink s;
  // A full queue: one request waits in the engine before the actor exists (it steps only when
  // told), so the actor's first submit finds max_waiting requests waiting.
  eng.submit(s.make("filler", prompt_of(4, 3), 2));
  actors::serve_scheduler_client sched(*m.sys, eng);
  EXPECT_THROW(sched.submit(s.make("over", prompt_of(4, 4), 2)), elastic::engine_busy);
  try {
    sched.submit(s.make("bad", {1, 2, 100000}, 4));
    FAIL() << "a token outside the vocabulary was accepted";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos) << e.what();
  }
  sched.abort("filler");  // the actor steps now: the filler ends with "abort"
  ASSERT_TRUE(s.wait(1));
  EXPECT_EQ(s.reason["filler"], "abort");
  EXPECT_EQ(s.ids.count("over") + s.ids.count("bad"), 0u);  // refused: never queued
  // A running request aborted mid-way: its first event holds the actor until the abort is sent.
  std::promise<void> entered, release;
  auto released = release.get_future().share();
  s.on_first = [&](const std::string& id) {
    if (id != "long") return;
    entered.set_value();
    released.wait();
  };
  sched.submit(s.make("long", prompt_of(6, 1), 100));
  entered.get_future().wait();
  sched.abort("long");
  release.set_value();
  ASSERT_TRUE(s.wait(2));
  EXPECT_EQ(s.reason["long"], "abort");
  EXPECT_LT(s.ids["long"].size(), 100u);
  EXPECT_EQ(eng.stats().kv.blocks_used, 0);
  sched.stop();
  EXPECT_THROW(sched.submit(s.make("late", prompt_of(4, 2), 2)), runtime::error);
}

TEST(ServeScheduler, StopAbortsWhatIsLeft) {
  fixture_model m;
  elastic::engine eng(*m.dec, *m.tok, fixture_model::blocks(64));
  actors::serve_scheduler_client sched(*m.sys, eng);
  sink s;
  sched.submit(s.make("a", prompt_of(6, 3), 100000));
  sched.submit(s.make("b", prompt_of(7, 4), 100000));
  sched.stop();
  ASSERT_TRUE(s.wait(2, 1000));
  EXPECT_EQ(s.reason["a"], "abort");
  EXPECT_EQ(s.reason["b"], "abort");
}

}  // namespace
