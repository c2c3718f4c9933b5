// An elastic data-parallel serving group (elastic/scale/dp_group.h invariant 7, dp_member.h) on
// threads: a pool of 4 ranks serves the Mixtral fixture while the group goes 1 -> 2 -> 4 -> 2 -> 1
// ranks under a stream of greedy requests; every request ends once, with the tokens of
// generate_greedy, although samples move off the ranks that leave. Bad scale requests are refused
// with their status and change nothing; a weight that arrives corrupted fails the change by name; a
// server stopped while a change is under way completes it and every rank ends; a rank lost while it
// serves is survived.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <condition_variable>

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "elastic/scale/dp_member.h"
#include "parallel/data/bpe_tokenizer.h"
#include "runtime/error.h"
#include "serve_group_util.h"

namespace {

using namespace troupe;
using namespace troupe::elastic;
using namespace troupe_test;

// Communicators made collectively by the members of a group: the first caller makes the group.
struct inproc_factory {
  int timeout_ms = 30000;
  // Optional: wraps each communicator made for a pool rank (tests that break one).
  std::function<std::unique_ptr<runtime::communicator>(std::unique_ptr<runtime::communicator>, int pool_rank)> wrap;
  std::mutex mu;
  std::map<std::string, std::vector<std::unique_ptr<runtime::communicator>>> made;
  std::map<std::string, int> taken;
  dp_comm_factory bind(int pool_rank) {
    return [this, pool_rank](runtime::communicator&, const std::vector<int>& members, const std::string& name) {
      std::lock_guard<std::mutex> g(mu);
      auto& v = made[name];
      if (v.empty()) v = runtime::make_inproc_group(static_cast<int>(members.size()), timeout_ms);
      ++taken[name];
      const auto at = std::find(members.begin(), members.end(), pool_rank) - members.begin();
      auto c = std::move(v[static_cast<size_t>(at)]);
      return wrap ? wrap(std::move(c), pool_rank) : std::move(c);
    };
  }
};

struct outcome {
  std::map<std::string, std::vector<int32_t>> ids;
  std::map<std::string, int> finished;
  std::map<std::string, std::string> reason, error;
};

sampling_params greedy(int64_t n) {
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = n;
  p.ignore_eos = true;
  return p;
}

parallel::ep::ep_options llep() {
  parallel::ep::ep_options o;
  o.mode = parallel::ep::ep_mode::llep;
  o.llep.lambda = 1.0;
  return o;
}

// A greedy request of n samples to `lead`; its events are collected in `out` under `mu` (by id, or
// id#i when n > 1) and it is remembered in `sent`.
void submit_greedy(dp_leader& lead, outcome& out, std::mutex& mu,
                   std::vector<std::pair<std::string, std::vector<int32_t>>>& sent, const std::string& id,
                   std::vector<int32_t> prompt, int64_t max_tokens, int64_t n) {
  engine_request e;
  e.id = id;
  e.prompt = std::move(prompt);
  e.params = greedy(max_tokens);
  e.n = n;
  sent.emplace_back(e.id, e.prompt);
  e.on_event = [&out, &mu, id, n](const engine_event& ev) {
    std::lock_guard<std::mutex> g(mu);
    const std::string key = n == 1 ? id : fmt::format("{}#{}", id, ev.index);
    out.ids[key].insert(out.ids[key].end(), ev.token_ids.begin(), ev.token_ids.end());
    if (ev.finished) {
      ++out.finished[key];
      out.reason[key] = ev.finish_reason;
      out.error[key] = ev.error;
    }
  };
  lead.submit(std::move(e));
}

// Every sample of every request sent ended once, by length, with the tokens of generate_greedy.
void expect_every_answer_greedy(const parallel::decoder& ref, const outcome& out,
                                const std::vector<std::pair<std::string, std::vector<int32_t>>>& sent,
                                const std::function<int64_t(int64_t)>& max_tokens_of,
                                const std::function<int64_t(int64_t)>& n_of) {
  for (const auto& [id, prompt] : sent) {
    const int64_t k = std::stoi(id.substr(1));
    const auto want = greedy_tail(ref, prompt, max_tokens_of(k));
    std::vector<std::string> keys{id};
    if (n_of(k) > 1) keys = {fmt::format("{}#0", id), fmt::format("{}#1", id)};
    for (const auto& key : keys) {
      EXPECT_EQ(out.finished.count(key) ? out.finished.at(key) : 0, 1) << key;
      EXPECT_EQ(out.reason.count(key) ? out.reason.at(key) : "", "length")
          << key << ": " << (out.error.count(key) ? out.error.at(key) : "");
      EXPECT_EQ(out.ids.count(key) ? out.ids.at(key) : std::vector<int32_t>{}, want) << key;
    }
  }
}

TEST(DpScale, GrowAndShrinkWhileServingKeepsEveryAnswerEqualToGenerateGreedy) {
  const int W = 4;
  auto pool = runtime::make_inproc_group(W, 30000), xfer = runtime::make_inproc_group(W, 30000);
  inproc_factory factory;
  const parallel::model_weights ref_w = parallel::model_weights::load(fixture("mixtral_moe"));
  const parallel::decoder ref(ref_w);
  const int64_t V = ref_w.config().vocab_size;
  outcome out;
  std::mutex mu;
  std::vector<dp_scale_status> after;  // the status after each change
  int64_t bytes_received_by_joiners = 0, bytes_mapped_by_joiners = 0;
  std::vector<std::pair<std::string, std::vector<int32_t>>> sent;
  const auto errors = run_ranks(W, pool, nullptr, [&](int r) {
    dp_member m(*pool[static_cast<size_t>(r)], *xfer[static_cast<size_t>(r)], factory.bind(r), llep());
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.block_size = 4;
    o.max_batch_tokens = 16;  // chunked prefill: moves happen mid-prefill too
    const int64_t blocks = 48;
    if (r != 0) {
      m.start_standby(ref_w.config());
      const auto sum = dp_serve_follower(m, bt, o, blocks, m.elastic());
      std::lock_guard<std::mutex> g(mu);
      bytes_received_by_joiners += static_cast<int64_t>(m.total_transfer().bytes_received);
      bytes_mapped_by_joiners += static_cast<int64_t>(m.total_transfer().bytes_mapped);
      EXPECT_GE(sum.joins, 1) << "rank " << r;
      return;
    }
    m.load(parallel::model_weights::load(fixture("mixtral_moe")), 1);
    o.group_member = true;
    local_executor exec(m.decoder(), blocks, o.block_size);
    engine eng(exec, bt, o);
    dp_leader lead(eng, m.comm(), make_dp_dispatch("round_robin", 1, o.block_size), {}, m.elastic());
    int next = 0;
    auto submit = [&](int count) {
      for (int k = 0; k < count; ++k, ++next)
        submit_greedy(lead, out, mu, sent, fmt::format("q{}", next), ids(5 + next % 7, next + 1, V),
                      14 + next % 5, next % 5 == 3 ? 2 : 1);
    };
    auto steps = [&](int k) {
      for (int i = 0; i < k; ++i) lead.step();
    };
    auto change = [&](int ranks) {
      lead.request_scale(ranks);
      EXPECT_THROW(lead.request_scale(ranks == 1 ? 2 : 1), dp_scale_refused) << "a change is pending";
      lead.step();  // the moves start; the group goes on serving on the old layout
      for (int i = 0; i < 2000 && lead.scale_status().state != "done"; ++i) lead.step();
      after.push_back(lead.scale_status());
    };
    submit(6);
    steps(3);
    change(2);
    submit(6);
    steps(4);
    change(4);
    submit(8);
    steps(6);
    change(2);  // ranks 2 and 3 leave mid-generation: their samples resume on 0 and 1
    submit(4);
    steps(3);
    change(1);
    for (int i = 0; i < 400 && eng.has_work(); ++i) lead.step();
    for (int i = 0; i < 5; ++i) lead.step();
    // Refusals: nothing changes.
    for (int bad : {0, 5, 1}) {
      try {
        lead.request_scale(bad);
        ADD_FAILURE() << "request_scale(" << bad << ") was accepted";
      } catch (const dp_scale_refused& e) {
        EXPECT_EQ(e.status(), 400) << bad << ": " << e.what();
      }
    }
    EXPECT_EQ(lead.scale_status().ranks, 1);
    EXPECT_EQ(lead.scale_status().state, "done");
    lead.shutdown();
  });
  for (int r = 0; r < W; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  ASSERT_EQ(after.size(), 4u);
  const int expect_ranks[] = {2, 4, 2, 1};
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(after[i].ranks, expect_ranks[i]);
    EXPECT_EQ(after[i].epoch, static_cast<int64_t>(i) + 2);
  }
  EXPECT_EQ(after.back().scale_ups, 2);
  EXPECT_EQ(after.back().scale_downs, 2);
  EXPECT_GT(after.back().moved_samples, 0) << "the ranks that left had samples running";
  // One process, so one host: every weight moved as pages (dp_member.h invariant 9), none as bytes.
  EXPECT_GT(bytes_mapped_by_joiners, 0);
  EXPECT_EQ(bytes_received_by_joiners, 0);
  expect_every_answer_greedy(
      ref, out, sent, [](int64_t k) { return 14 + k % 5; }, [](int64_t k) { return k % 5 == 3 ? 2 : 1; });
}

// Forwards every operation to another communicator (owned, or borrowed): the tests' wrappers override
// the operations they watch.
class forwarding_comm : public runtime::communicator {
 public:
  explicit forwarding_comm(runtime::communicator& c) : c_(c) {}
  explicit forwarding_comm(std::unique_ptr<runtime::communicator> c) : owned_(std::move(c)), c_(*owned_) {}
  int rank() const override { return c_.rank(); }
  int size() const override { return c_.size(); }
  std::string backend() const override { return c_.backend(); }
  void all_reduce(runtime::tensor& t, runtime::reduce_op op) override { c_.all_reduce(t, op); }
  void reduce_scatter(runtime::tensor& o, const runtime::tensor& i, runtime::reduce_op op) override {
    c_.reduce_scatter(o, i, op);
  }
  void all_gather(runtime::tensor& o, const runtime::tensor& i) override { c_.all_gather(o, i); }
  void all_to_all_v(runtime::tensor& r, const std::vector<int64_t>& rc, const runtime::tensor& s,
                    const std::vector<int64_t>& sc) override {
    c_.all_to_all_v(r, rc, s, sc);
  }
  void broadcast(runtime::tensor& t, int root) override { c_.broadcast(t, root); }
  void send(const runtime::tensor& t, int peer, int tag) override { c_.send(t, peer, tag); }
  void recv(runtime::tensor& t, int peer, int tag) override { c_.recv(t, peer, tag); }
  void barrier() override { c_.barrier(); }
  void abort(const std::string& reason) override { c_.abort(reason); }

 protected:
  std::unique_ptr<runtime::communicator> owned_;
  runtime::communicator& c_;
};

// A pool communicator whose first weight message (dp_member's tag) arrives with one byte flipped.
class corrupting_comm final : public forwarding_comm {
 public:
  using forwarding_comm::forwarding_comm;
  void send(const runtime::tensor& t, int peer, int tag) override {
    if (tag == 20112 && !done_ && t.dtype() == runtime::dtype::f32) {  // the first weight's bytes, not the headers
      done_ = true;
      runtime::tensor bad = t.clone();
      static_cast<uint8_t*>(bad.data_ptr())[5] ^= 0x10;
      c_.send(bad, peer, tag);
      return;
    }
    c_.send(t, peer, tag);
  }

 private:
  bool done_ = false;
};

// A communicator that runs `before` before each broadcast it joins (and `before_send` before each send).
class hooked_comm final : public forwarding_comm {
 public:
  hooked_comm(std::unique_ptr<runtime::communicator> c, std::function<void(const runtime::tensor&)> before,
              std::function<void(const runtime::tensor&)> before_send = nullptr)
      : forwarding_comm(std::move(c)), before_(std::move(before)), before_send_(std::move(before_send)) {}
  void broadcast(runtime::tensor& t, int root) override {
    before_(t);
    c_.broadcast(t, root);
  }
  void send(const runtime::tensor& t, int peer, int tag) override {
    if (before_send_) before_send_(t);
    c_.send(t, peer, tag);
  }

 private:
  std::function<void(const runtime::tensor&)> before_, before_send_;
};

TEST(DpScale, AWeightThatArrivesCorruptedFailsTheChangeNamingIt) {
  auto pool = runtime::make_inproc_group(2, 3000), xfer = runtime::make_inproc_group(2, 3000);
  inproc_factory factory;
  factory.timeout_ms = 3000;
  const parallel::model_weights w = parallel::model_weights::load(fixture("mixtral_moe"));
  const auto errors = run_ranks(2, pool, nullptr, [&](int r) {
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.block_size = 4;
    if (r == 1) {
      dp_member m(*pool[1], *xfer[1], factory.bind(1), llep(), dp_weight_memory::copy);
      m.start_standby(w.config());
      dp_serve_follower(m, bt, o, 16, m.elastic());
      return;
    }
    corrupting_comm bad(*xfer[0]);  // copied bytes (a mapping is checked the same way, and copied when it fails)
    dp_member m(*pool[0], bad, factory.bind(0), llep(), dp_weight_memory::copy);
    m.load(parallel::model_weights::load(fixture("mixtral_moe")), 1);
    o.group_member = true;
    local_executor exec(m.decoder(), 16, o.block_size);
    engine eng(exec, bt, o);
    dp_leader lead(eng, m.comm(), make_dp_dispatch("round_robin", 1, o.block_size), {}, m.elastic());
    lead.request_scale(2);
    engine_request e;  // work for the group, so that the next iterations need rank 1
    e.id = "a";
    e.prompt = ids(6, 1, w.config().vocab_size);
    e.params = greedy(4);
    lead.submit(std::move(e));
    for (int i = 0; i < 2000 && !lead.broken(); ++i) {  // until the commit, whose first iteration fails
      try {
        lead.step();
      } catch (const std::exception&) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_TRUE(lead.broken()) << "a failed change breaks the group (dp_group.h invariant 7)";
  });
  EXPECT_NE(errors[1].find("checksum (XXH3-64)"), std::string::npos) << errors[1];
  EXPECT_NE(errors[1].find("model.embed_tokens.weight from rank 0 to rank 1"), std::string::npos) << errors[1];
}

TEST(DpScale, StoppingWhileAChangeIsUnderWayCompletesItAndEveryRankEnds) {
  const int W = 3;
  auto pool = runtime::make_inproc_group(W, 30000), xfer = runtime::make_inproc_group(W, 30000);
  inproc_factory factory;
  const parallel::model_weights w = parallel::model_weights::load(fixture("mixtral_moe"));
  std::vector<int64_t> joins(W, 0);
  int layout = 0;
  const auto errors = run_ranks(W, pool, nullptr, [&](int r) {
    dp_member m(*pool[static_cast<size_t>(r)], *xfer[static_cast<size_t>(r)], factory.bind(r), llep());
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.block_size = 4;
    if (r != 0) {
      m.start_standby(w.config());
      joins[static_cast<size_t>(r)] = dp_serve_follower(m, bt, o, 16, m.elastic()).joins;
      return;
    }
    m.load(parallel::model_weights::load(fixture("mixtral_moe")), 1);
    o.group_member = true;
    local_executor exec(m.decoder(), 16, o.block_size);
    engine eng(exec, bt, o);
    dp_leader lead(eng, m.comm(), make_dp_dispatch("round_robin", 1, o.block_size), {}, m.elastic());
    lead.request_scale(2);
    lead.step();  // the moves start
    lead.shutdown();
    layout = static_cast<int>(lead.scale_status().epoch);
  });
  for (int r = 0; r < W; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_EQ(joins[1], 1) << "rank 1 finished joining, then heard the end";
  EXPECT_EQ(joins[2], 0) << "rank 2 stayed standby and heard the end";
  EXPECT_EQ(layout, 2);
}

// dp_group.h invariant 8: a member lost while it serves (pool rank 2 of a 4-rank group, mid-generation)
// is survived. What the worker does on MemberLost is done here by rank 0: every member hears of the
// loss and the group's communicators are aborted (the lost rank's thread leaves), either between two
// iterations, or inside one after every rank ran its model step and sent its report and before rank 0
// took any (the reports come back in the recovery, once), or as rank 0 broadcasts an iteration's
// requests (no rank takes them in: the recovery sends them again). The survivors rebuild the group, read the
// lost rank's experts again from the checkpoint, and every request still ends once with the tokens of
// generate_greedy; the group then shrinks and refuses to grow past the processes alive.
enum class loss_point { between_iterations, after_the_model_step, in_the_step_broadcast, right_after_a_change };

void lose_a_rank_while_serving(loss_point when) {
  const int W = 4, lost_rank = 2;
  auto pool = runtime::make_inproc_group(W, 30000), xfer = runtime::make_inproc_group(W, 30000);
  inproc_factory factory;
  std::function<void()> lose_in_broadcast;  // armed by rank 0 (in_the_step_broadcast)
  factory.wrap = [&](std::unique_ptr<runtime::communicator> c, int pool_rank) -> std::unique_ptr<runtime::communicator> {
    if (pool_rank != 0 || c->size() < 2) return c;
    return std::make_unique<hooked_comm>(std::move(c), [&](const runtime::tensor& t) {
      if (t.dtype() != runtime::dtype::u8 || !lose_in_broadcast) return;  // an iteration's requests
      auto f = std::move(lose_in_broadcast);
      lose_in_broadcast = nullptr;
      f();
    });
  };
  const std::string dir = fixture("mixtral_moe");
  const parallel::model_weights ref_w = parallel::model_weights::load(dir);
  const parallel::decoder ref(ref_w);
  const int64_t V = ref_w.config().vocab_size;
  outcome out;
  std::mutex mu;
  std::vector<dp_member*> members(W, nullptr);
  std::string lost_error;
  dp_scale_status recovered, last;
  std::vector<std::pair<std::string, std::vector<int32_t>>> sent;
  const auto errors = run_ranks(W, pool, nullptr, [&](int r) {
    dp_member m(*pool[static_cast<size_t>(r)], *xfer[static_cast<size_t>(r)], factory.bind(r), llep());
    {
      std::lock_guard<std::mutex> g(mu);
      members[static_cast<size_t>(r)] = &m;
    }
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.block_size = 4;
    o.max_batch_tokens = 16;
    const int64_t blocks = 48;
    if (r != 0) {
      m.start_standby_from(dir, ref_w.config());
      try {
        dp_serve_follower(m, bt, o, blocks, m.elastic());
      } catch (const std::exception& e) {
        if (r != lost_rank) throw;
        std::lock_guard<std::mutex> g(mu);
        lost_error = e.what();  // the lost rank leaves; the pool stays up for the others
      }
      return;
    }
    m.load(dir, 1);
    o.group_member = true;
    local_executor exec(m.decoder(), blocks, o.block_size);
    engine eng(exec, bt, o);
    bool kill_now = false;
    auto lose = [&] {
      std::lock_guard<std::mutex> g(mu);
      for (dp_member* x : members) x->mark_lost(lost_rank);
      for (auto* c : m.group_comms()) c->abort("rank 2 was lost");  // one group: every member's fails
    };
    bool kill_after_commit = false;
    dp_leader* leader = nullptr;
    group_hooks hooks;
    hooks.after_step = [&](int64_t) {  // rank 0's model step is done; the others' reports are on the way
      if (kill_after_commit && leader->scale_status().epoch == 2) {  // the first iteration on 4 ranks
        kill_after_commit = false;
        EXPECT_EQ(leader->scale_status().state, "moving") << "the change is not done before this iteration is";
        lose();
      }
      if (!kill_now) return;
      kill_now = false;
      lose();
    };
    dp_leader lead(eng, m.comm(), make_dp_dispatch("round_robin", 1, o.block_size), hooks, m.elastic());
    leader = &lead;
    int next = 0;
    auto submit = [&](int count) {
      for (int k = 0; k < count; ++k, ++next)
        submit_greedy(lead, out, mu, sent, fmt::format("q{}", next), ids(5 + next % 7, next + 3, V),
                      12 + next % 5, next % 4 == 1 ? 2 : 1);
    };
    auto change = [&](int ranks) {
      lead.request_scale(ranks);
      for (int i = 0; i < 2000 && lead.scale_status().state != "done"; ++i) lead.step();
      ASSERT_EQ(lead.scale_status().state, "done");
    };
    if (when == loss_point::right_after_a_change) {  // lost in the first iteration on the new layout
      submit(12);
      for (int i = 0; i < 3; ++i) lead.step();
      kill_after_commit = true;
      lead.request_scale(4);
      lead.step();  // the moves start; they end while nothing steps, so the commit's iteration has work
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      for (int i = 0; i < 2000 && lead.scale_status().recoveries == 0; ++i) lead.step();
      submit(4);
      lead.step();
    } else {
      change(4);
      submit(12);
      for (int i = 0; i < 5; ++i) lead.step();  // every rank is mid-generation
    }
    if (when == loss_point::right_after_a_change) {
    } else if (when == loss_point::after_the_model_step) {
      kill_now = true;
      submit(4);     // carried by the iteration that fails
      lead.step();   // fails after the model step, recovers
    } else if (when == loss_point::in_the_step_broadcast) {
      lose_in_broadcast = lose;
      submit(4);     // carried by the iteration that fails before any rank took them in: sent again
      lead.step();   // fails in the broadcast, recovers
    } else {
      lose();
      submit(4);     // queued while the group is broken: dispatched once it is rebuilt
      lead.step();   // rebuilds the group
    }
    recovered = lead.scale_status();
    for (int i = 0; i < 6; ++i) lead.step();
    change(2);  // from the recovery's placement to a contiguous one: experts move again
    try {
      lead.request_scale(4);
      ADD_FAILURE() << "4 ranks accepted with 3 processes alive";
    } catch (const dp_scale_refused& e) {
      EXPECT_EQ(e.status(), 400);
      EXPECT_NE(std::string(e.what()).find("1 lost"), std::string::npos) << e.what();
    }
    submit(4);
    for (int i = 0; i < 400 && (eng.has_work() || lead.inbox_pending()); ++i) lead.step();
    for (int i = 0; i < 40; ++i) lead.step();
    last = lead.scale_status();
    lead.shutdown();
  });
  for (int r = 0; r < W; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_NE(lost_error.find("rank 2 was lost"), std::string::npos) << lost_error;
  EXPECT_EQ(recovered.ranks, 3);
  EXPECT_EQ(recovered.recoveries, 1);
  EXPECT_EQ(recovered.lost_ranks, 1);
  EXPECT_EQ(recovered.pool_ranks, 3);
  EXPECT_EQ(recovered.epoch, 3) << "layouts: 1, the change to 4, the recovery";
  if (when != loss_point::right_after_a_change)
    EXPECT_GT(recovered.moved_samples, 0) << "the lost rank had samples running";
  else
    EXPECT_EQ(recovered.state, "done") << "the change completed, then the group recovered";
  EXPECT_EQ(last.ranks, 2);
  ASSERT_EQ(sent.size(), 20u);
  expect_every_answer_greedy(
      ref, out, sent, [](int64_t k) { return 12 + k % 5; }, [](int64_t k) { return k % 4 == 1 ? 2 : 1; });
}

// dp_member.h invariant 11: a rank lost while a change's weights move (copied: they take a while) gives the
// change up. Each change's moves go through a communicator of its own (an in-process group of the pool
// per change here), which the loss aborts on every rank, as the worker does on MemberLost. Either the
// joining rank is lost (1 -> 2), or an old member while two ranks join (2 -> 4): the group goes on as
// before the change, less what was lost; joining ranks that survive are standby again and are taken in
// by a later change; every request still ends once with the tokens of generate_greedy.
void lose_a_rank_while_the_weights_move(int first, int target, int lost_rank) {
  const int W = 4;
  auto pool = runtime::make_inproc_group(W, 30000), xfer = runtime::make_inproc_group(W, 30000);
  // What the worker does on MemberLost, on every survivor: every communicator handed out for a group
  // (a layout's or a change's) with the lost rank in it is aborted.
  struct registry {
    std::mutex mu;
    std::vector<std::pair<runtime::communicator*, std::vector<int>>> live;
    void abort_with(int rank, const std::string& why) {
      std::lock_guard<std::mutex> g(mu);
      for (auto& [c, ranks] : live)
        if (std::find(ranks.begin(), ranks.end(), rank) != ranks.end()) c->abort(why);
    }
  } reg;
  struct tracked final : forwarding_comm {  // registered while it lives
    tracked(std::unique_ptr<runtime::communicator> c, registry& r, std::vector<int> ranks)
        : forwarding_comm(std::move(c)), r_(r) {
      std::lock_guard<std::mutex> g(r_.mu);
      r_.live.emplace_back(this, std::move(ranks));
    }
    ~tracked() override {
      std::lock_guard<std::mutex> g(r_.mu);
      std::erase_if(r_.live, [this](const auto& e) { return e.first == this; });
    }
    registry& r_;
  };
  inproc_factory factory;
  std::map<int, std::vector<int>> layout_members;  // what each layout's groups connect: set below
  factory.wrap = [&](std::unique_ptr<runtime::communicator> c, int) -> std::unique_ptr<runtime::communicator> {
    std::vector<int> all;  // a layout's group: the lost rank is in it or not; it is aborted with the group
    for (int i = 0; i < W; ++i) all.push_back(i);
    return std::make_unique<tracked>(std::move(c), reg, all);
  };
  std::mutex mm;
  std::map<std::string, std::vector<std::unique_ptr<runtime::communicator>>> moves_made;
  // The loss comes while rank 0's moves run: its moves' thread asks for it before the first weight it
  // sends and waits; rank 0's stepping thread makes it after its next model step or iteration
  // (in-process collectives read their peers' buffers, so rank 0 may not be inside one when the lost
  // rank's thread leaves).
  std::function<void()> lose_now;
  std::mutex lm;
  std::condition_variable lcv;
  bool loss_asked = false, loss_done = false;
  auto moves_for = [&](int r) -> dp_moves_factory {
    return [&, r](const std::string& name) -> std::unique_ptr<runtime::communicator> {
      std::lock_guard<std::mutex> g(mm);
      auto& v = moves_made[name];
      if (v.empty()) v = runtime::make_inproc_group(W, 30000);
      std::vector<int> all;
      for (int i = 0; i < W; ++i) all.push_back(i);
      std::unique_ptr<runtime::communicator> c = std::make_unique<tracked>(std::move(v[static_cast<size_t>(r)]), reg, all);
      if (r != 0) return c;
      return std::make_unique<hooked_comm>(std::move(c), [](const runtime::tensor&) {}, [&](const runtime::tensor& t) {
        if (t.dtype() != runtime::dtype::f32) return;
        std::unique_lock<std::mutex> l(lm);
        if (loss_asked) return;
        loss_asked = true;
        lcv.wait(l, [&] { return loss_done; });
      });
    };
  };
  const std::string dir = fixture("mixtral_moe");
  const parallel::model_weights ref_w = parallel::model_weights::load(dir);
  const parallel::decoder ref(ref_w);
  const int64_t V = ref_w.config().vocab_size;
  outcome out;
  std::mutex mu;
  std::vector<dp_member*> members(W, nullptr);
  std::string lost_error;
  dp_scale_status abandoned, last;
  std::vector<int> joins(W, 0);
  std::vector<std::pair<std::string, std::vector<int32_t>>> sent;
  const auto errors = run_ranks(W, pool, nullptr, [&](int r) {
    dp_member m(*pool[static_cast<size_t>(r)], *xfer[static_cast<size_t>(r)], factory.bind(r), llep(),
                dp_weight_memory::copy, moves_for(r));
    {
      std::lock_guard<std::mutex> g(mu);
      members[static_cast<size_t>(r)] = &m;
    }
    parallel::byte_text_tokenizer bt;
    engine_options o;
    o.block_size = 4;
    o.max_batch_tokens = 16;
    const int64_t blocks = 48;
    if (r != 0) {
      if (r < first) m.load(dir, first);
      else m.start_standby_from(dir, ref_w.config());
      try {
        joins[static_cast<size_t>(r)] = dp_serve_follower(m, bt, o, blocks, m.elastic()).joins;
      } catch (const std::exception& e) {
        if (r != lost_rank) throw;
        m.abandon();  // its moves' thread ends here, as it would with the process (which aborts nothing)
        std::lock_guard<std::mutex> g(mu);
        lost_error = e.what();  // the lost rank leaves; the pool stays up for the others
      }
      return;
    }
    m.load(dir, first);
    o.group_member = true;
    local_executor exec(m.decoder(), blocks, o.block_size);
    engine eng(exec, bt, o);
    lose_now = [&] {
      {
        std::lock_guard<std::mutex> g(mu);
        for (dp_member* x : members) x->mark_lost(lost_rank);
      }
      reg.abort_with(lost_rank, fmt::format("rank {} was lost", lost_rank));
    };
    auto lose_if_asked = [&] {
      std::lock_guard<std::mutex> l(lm);
      if (!loss_asked || loss_done) return;
      lose_now();
      loss_done = true;
      lcv.notify_all();
    };
    group_hooks hooks;
    hooks.after_step = [&](int64_t) { lose_if_asked(); };  // after a model step, or between two iterations
    dp_leader lead(eng, m.comm(), make_dp_dispatch("round_robin", first, o.block_size), hooks, m.elastic());
    int next = 0;
    auto submit = [&](int count) {
      for (int k = 0; k < count; ++k, ++next)
        submit_greedy(lead, out, mu, sent, fmt::format("q{}", next), ids(5 + next % 7, next + 3, V), 12 + next % 5,
                      next % 4 == 1 ? 2 : 1);
    };
    submit(8);
    for (int i = 0; i < 3; ++i) lead.step();
    for (bool all = false; !all; std::this_thread::yield()) {  // every rank can be told of the loss
      std::lock_guard<std::mutex> g(mu);
      all = std::find(members.begin(), members.end(), nullptr) == members.end();
    }
    lead.request_scale(target);
    for (int i = 0; i < 2000 && lead.scale_status().recoveries == 0; ++i) {
      lead.step();
      lose_if_asked();
    }
    abandoned = lead.scale_status();
    submit(4);
    lead.request_scale(2);  // into a standby rank that survived
    for (int i = 0; i < 2000 && lead.scale_status().state != "done"; ++i) lead.step();
    for (int i = 0; i < 400 && (eng.has_work() || lead.inbox_pending()); ++i) lead.step();
    last = lead.scale_status();
    lead.shutdown();
  });
  for (int r = 0; r < W; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_NE(lost_error.find(fmt::format("rank {} was lost", lost_rank)), std::string::npos) << lost_error;
  EXPECT_EQ(abandoned.state, "failed");
  EXPECT_NE(abandoned.error.find(fmt::format("abandoned: pool rank(s) {} were lost while the weights moved", lost_rank)),
            std::string::npos)
      << abandoned.error;
  EXPECT_EQ(abandoned.abandoned, 1);
  EXPECT_EQ(abandoned.recoveries, 1);
  EXPECT_EQ(abandoned.ranks, lost_rank < first ? first - 1 : first) << "the group before the change, less the lost";
  EXPECT_EQ(abandoned.pool_ranks, W - 1);
  EXPECT_EQ(last.state, "done");
  EXPECT_EQ(last.ranks, 2);
  EXPECT_EQ(joins[2], 1) << "rank 2 (standby again if it was joining) was taken in by the later change";
  ASSERT_EQ(sent.size(), 12u);
  expect_every_answer_greedy(
      ref, out, sent, [](int64_t k) { return 12 + k % 5; }, [](int64_t k) { return k % 4 == 1 ? 2 : 1; });
}

TEST(DpScale, AJoiningRankLostWhileTheWeightsMoveGivesTheChangeUp) { lose_a_rank_while_the_weights_move(1, 2, 1); }

TEST(DpScale, AnOldMemberLostWhileTheWeightsMoveGivesTheChangeUpAndTheJoinersWaitAgain) {
  lose_a_rank_while_the_weights_move(2, 4, 1);
}

TEST(DpScale, ARankLostBetweenIterationsIsSurvivedAndEveryAnswerStaysEqualToGenerateGreedy) {
  lose_a_rank_while_serving(loss_point::between_iterations);
}

TEST(DpScale, ARankLostAfterTheModelStepIsSurvivedAndItsReportsArriveOnce) {
  lose_a_rank_while_serving(loss_point::after_the_model_step);
}

TEST(DpScale, ARankLostAsAnIterationIsBroadcastIsSurvivedAndItsRequestsSentAgain) {
  lose_a_rank_while_serving(loss_point::in_the_step_broadcast);
}

TEST(DpScale, ARankLostInTheFirstIterationAfterAChangeIsSurvived) {
  lose_a_rank_while_serving(loss_point::right_after_a_change);
}

}  // namespace
