// Supervisor-driven expert placement (issue #7 item 5): the load EMA, the persistence rule, the
// placement proposal (exact numbers), the collective version agreement, the supervisor's balancer
// on hand-made reports, and end to end: a supervisor and 4 workers over loopback running a loop of
// standard-EP MoE forwards on skewed routing, reporting loads, switching placement when told —
// the imbalance falls, outputs stay bitwise equal to the single-rank layer, weights end on their
// new ranks.
#include "parallel/ep/ep_rebalance.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <caf/io/all.hpp>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "actors/expert_balancer.h"
#include "actors/supervisor.h"
#include "parallel/ep/ep_layer.h"
#include "parallel/model/model_weights.h"
#include "parallel/model/moe_block.h"
#include "runtime/communicator.h"
#include "runtime/error.h"
#include "runtime/io/hf_config.h"

using namespace troupe;
using parallel::ep::ep_load_tracker;
using parallel::ep::ep_placement;
using parallel::ep::ep_rebalance_options;
using parallel::ep::ep_rebalance_propose;
using parallel::ep::ep_rebalancer;
using control::Command;
using runtime::errc;

namespace {

// Rows per rank of a placement, as integers (the loads in these tests are whole numbers).
std::vector<int64_t> rank_loads(const std::vector<double>& loads, const ep_placement& p) {
  std::vector<int64_t> out;
  for (double x : parallel::ep::ep_rank_loads(loads, p)) out.push_back(static_cast<int64_t>(x));
  return out;
}

template <class F>
errc error_code_of(F&& f) {
  try {
    f();
  } catch (const runtime::error& e) {
    return e.code();
  }
  return errc::internal;  // "did not throw": no test expects errc::internal
}

}  // namespace

// ---- tracker -------------------------------------------------------------------------

TEST(EpRebalance, TrackerStartsAtTheFirstLoadsThenDecays) {
  ep_load_tracker t(3, 0.5);
  t.observe({4, 0, 2});
  EXPECT_EQ(t.ema(), (std::vector<double>{4, 0, 2}));
  t.observe({0, 8, 2});
  EXPECT_EQ(t.ema(), (std::vector<double>{2, 4, 2}));
  t.observe({2, 0, 0});
  EXPECT_EQ(t.ema(), (std::vector<double>{2, 2, 1}));
  EXPECT_EQ(t.steps(), 3);
  EXPECT_EQ(error_code_of([&] { t.observe({1, 2}); }), errc::invalid_argument);
  EXPECT_EQ(error_code_of([&] { t.observe({1, -2, 0}); }), errc::invalid_argument);
  EXPECT_EQ(t.ema(), (std::vector<double>{2, 2, 1})) << "a rejected observation must not change the EMA";
  EXPECT_EQ(error_code_of([] { ep_load_tracker(3, 1.0); }), errc::invalid_argument);
}

TEST(EpRebalance, TheRanksEmasSumToTheGroupsEma) {
  ep_load_tracker a(4, 0.75), b(4, 0.75), group(4, 0.75);
  const std::vector<std::vector<int64_t>> la = {{8, 0, 4, 0}, {4, 4, 0, 0}, {0, 0, 0, 16}};
  const std::vector<std::vector<int64_t>> lb = {{0, 8, 4, 4}, {12, 0, 0, 4}, {4, 4, 4, 4}};
  for (size_t s = 0; s < la.size(); ++s) {
    a.observe(la[s]);
    b.observe(lb[s]);
    std::vector<int64_t> sum(4);
    for (size_t e = 0; e < 4; ++e) sum[e] = la[s][e] + lb[s][e];
    group.observe(sum);
  }
  for (size_t e = 0; e < 4; ++e) EXPECT_EQ(a.ema()[e] + b.ema()[e], group.ema()[e]) << "expert " << e;
  // {8,8,8,4} -> .75 x + .25 {16,4,0,4} = {10,7,6,4} -> .75 x + .25 {4,4,4,20} = {8.5,6.25,5.5,8}.
  EXPECT_EQ(group.ema(), (std::vector<double>{8.5, 6.25, 5.5, 8}));
}

// ---- proposal ------------------------------------------------------------------------

TEST(EpRebalance, ProposalPacksByLoadKeepsEPerRankAndMovesOnlyWhatItMust) {
  // Contiguous over 4 ranks: {70, 20, 6, 4}, max/mean 70/25 = 2.8.
  const std::vector<double> loads = {40, 30, 10, 10, 3, 3, 2, 2};
  const auto cur = ep_placement::contiguous(8, 4);
  EXPECT_DOUBLE_EQ(parallel::ep::ep_native_max_over_mean(loads, cur), 2.8);
  const auto p = ep_rebalance_propose(loads, cur);
  // LPT bins: {40,2} {30,2} {10,3} {10,3} = 42, 32, 13, 13 -> 42/25 = 1.68.
  EXPECT_DOUBLE_EQ(p.before, 2.8);
  EXPECT_DOUBLE_EQ(p.after, 1.68);
  auto rl = rank_loads(loads, p.placement);
  std::sort(rl.begin(), rl.end());
  EXPECT_EQ(rl, (std::vector<int64_t>{13, 13, 32, 42}));
  for (int r = 0; r < 4; ++r) EXPECT_EQ(p.placement.experts_of(r).size(), 2u) << "rank " << r;
  // Each bin holds one expert of two different current ranks; matching bins to ranks keeps one
  // per rank home: 4 moves (bin b -> rank b would move 6).
  EXPECT_EQ(p.moved, 4);
  EXPECT_EQ(p.placement.native, (std::vector<int>{0, 3, 1, 2, 1, 2, 3, 0}));
  // Deterministic.
  EXPECT_EQ(ep_rebalance_propose(loads, cur).placement.native, p.placement.native);
}

TEST(EpRebalance, EqualLoadExpertsSwapToStayHome) {
  // {0, 6 | 0, 5}: LPT pairs 6 with a zero and 5 with a zero; which zero is free. The swap pass
  // keeps both zeros where they are, so the proposal is the current placement (no move).
  const std::vector<double> loads = {0, 6, 0, 5};
  const auto cur = ep_placement::contiguous(4, 2);
  const auto p = ep_rebalance_propose(loads, cur);
  EXPECT_EQ(p.moved, 0);
  EXPECT_EQ(p.placement.native, cur.native);
  EXPECT_DOUBLE_EQ(p.after, p.before);
  EXPECT_DOUBLE_EQ(p.before, 12.0 / 11.0);
}

TEST(EpRebalance, ProposalRejectsUnevenPlacementsAndBadLoads) {
  ep_placement uneven;
  uneven.ranks = 2;
  uneven.native = {0, 0, 0, 1};
  EXPECT_EQ(error_code_of([&] { ep_rebalance_propose({1, 1, 1, 1}, uneven); }), errc::invalid_argument);
  const auto cur = ep_placement::contiguous(4, 2);
  EXPECT_EQ(error_code_of([&] { ep_rebalance_propose({1, 1, 1}, cur); }), errc::invalid_argument);
  EXPECT_EQ(error_code_of([&] { ep_rebalance_propose({1, -1, 1, 1}, cur); }), errc::invalid_argument);
}

// ---- persistence rule ----------------------------------------------------------------

TEST(EpRebalance, RuleFiresAfterPatienceThenCoolsDownAndNeedsAMargin) {
  ep_rebalance_options o;
  o.threshold = 1.5;
  o.patience = 3;
  o.cooldown = 2;
  o.min_improvement = 0.1;
  ep_rebalancer rb(ep_placement::contiguous(8, 4), o);
  const std::vector<double> skew = {40, 30, 10, 10, 3, 3, 2, 2};
  EXPECT_FALSE(rb.step(skew));
  EXPECT_FALSE(rb.step(skew));
  EXPECT_EQ(rb.streak(), 2);
  const auto change = rb.step(skew);  // 3rd imbalanced step
  ASSERT_TRUE(change);
  EXPECT_EQ(rb.version(), 1);
  EXPECT_DOUBLE_EQ(change->before, 2.8);
  EXPECT_DOUBLE_EQ(change->after, 1.68);
  EXPECT_EQ(rb.placement().native, change->placement.native);
  EXPECT_EQ(rb.cooldown_left(), 2);
  // Cooldown: two steps that do not count, whatever the loads.
  EXPECT_FALSE(rb.step(skew));
  EXPECT_FALSE(rb.step(skew));
  EXPECT_EQ(rb.streak(), 0);
  // 1.68 > 1.5 keeps counting, but the best proposal is no better: no change, version stays.
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(rb.step(skew));
  EXPECT_DOUBLE_EQ(rb.last_imbalance(), 1.68);
  EXPECT_EQ(rb.streak(), 5);
  EXPECT_EQ(rb.version(), 1);
}

TEST(EpRebalance, RuleNeedsConsecutiveStepsAboveTheThreshold) {
  ep_rebalance_options o;
  o.threshold = 2.0;
  o.patience = 2;
  o.cooldown = 0;
  ep_rebalancer rb(ep_placement::contiguous(4, 2), o);
  // {4,4 | 0,0}: max/mean 2.0 — at the threshold, not above: never counts.
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(rb.step({4, 4, 0, 0}));
  EXPECT_EQ(rb.streak(), 0);
  EXPECT_FALSE(rb.step({9, 4, 0, 0}));  // 13/6.5 = 2.0
  EXPECT_EQ(rb.version(), 0);
  // Interrupted streaks never fire: 13/7 = 1.86 > 1.5, then 1.0, and again.
  o.threshold = 1.5;
  ep_rebalancer flicker(ep_placement::contiguous(4, 2), o);
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(flicker.step({9, 4, 0, 1}));
    EXPECT_EQ(flicker.streak(), 1);
    EXPECT_FALSE(flicker.step({1, 1, 1, 1}));
    EXPECT_EQ(flicker.streak(), 0);
  }
  EXPECT_EQ(flicker.version(), 0);
  // A margin larger than the gain blocks the change: {8,2 | 0,0} -> best {8,0 | 2,0}: 2.0 -> 1.6.
  o.min_improvement = 0.25;  // needs <= 1.5
  ep_rebalancer strict(ep_placement::contiguous(4, 2), o);
  EXPECT_FALSE(strict.step({8, 2, 0, 0}));
  EXPECT_FALSE(strict.step({8, 2, 0, 0}));
  EXPECT_EQ(strict.version(), 0);
  o.min_improvement = 0.15;  // needs <= 1.7
  ep_rebalancer loose(ep_placement::contiguous(4, 2), o);
  EXPECT_FALSE(loose.step({8, 2, 0, 0}));
  const auto c = loose.step({8, 2, 0, 0});
  ASSERT_TRUE(c);
  EXPECT_DOUBLE_EQ(c->after, 1.6);
  EXPECT_EQ(c->moved, 2);
}

TEST(EpRebalance, OptionsAreValidated) {
  auto bad = [](auto edit) {
    ep_rebalance_options o;
    edit(o);
    return error_code_of([&] { o.validate(); });
  };
  EXPECT_EQ(bad([](ep_rebalance_options& o) { o.decay = 1.0; }), errc::invalid_argument);
  EXPECT_EQ(bad([](ep_rebalance_options& o) { o.threshold = 0.9; }), errc::invalid_argument);
  EXPECT_EQ(bad([](ep_rebalance_options& o) { o.patience = 0; }), errc::invalid_argument);
  EXPECT_EQ(bad([](ep_rebalance_options& o) { o.cooldown = -1; }), errc::invalid_argument);
  EXPECT_EQ(bad([](ep_rebalance_options& o) { o.min_improvement = 1.0; }), errc::invalid_argument);
  EXPECT_NO_THROW(ep_rebalance_options{}.validate());
}

// ---- agreement -----------------------------------------------------------------------

TEST(EpRebalance, RanksAgreeOnTheOldestVersionAnyOfThemHasSeen) {
  auto group = runtime::make_inproc_group(4, 10000);
  const std::vector<int64_t> seen = {3, 1, 2, 5};
  std::vector<int64_t> agreed(4, -1);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      agreed[static_cast<size_t>(r)] =
          parallel::ep::ep_agree_placement_version(*group[static_cast<size_t>(r)], seen[static_cast<size_t>(r)]);
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(agreed, (std::vector<int64_t>{1, 1, 1, 1}));
}

// ---- the supervisor's balancer -------------------------------------------------------

namespace {
control::ExpertLoads report(int64_t cmd, int64_t epoch, int64_t step, int layer, const std::vector<double>& ema) {
  control::ExpertLoads l;
  l.set_command_id(cmd), l.set_epoch(epoch), l.set_step(step), l.set_layer(layer);
  for (double x : ema) l.add_ema(x);
  return l;
}
}  // namespace

TEST(EpRebalance, BalancerSumsTheRanksReportsAndSendsOneUpdatePerChange) {
  ep_rebalance_options o;
  o.threshold = 1.2;
  o.patience = 2;
  o.cooldown = 0;
  actors::expert_balancer b(o);
  b.reset(/*group_epoch=*/1, /*group_size=*/2, /*command_id=*/7);
  // Rank 0's tokens: {6,0,0,0}; rank 1's: {2,2,0,0}; together {8,2 | 0,0}: 10/5 = 2.0.
  EXPECT_TRUE(b.add(0, report(7, 1, 0, 3, {6, 0, 0, 0})).empty());
  EXPECT_TRUE(b.add(0, report(7, 1, 0, 3, {6, 0, 0, 0})).empty()) << "a duplicate is dropped";
  EXPECT_TRUE(b.add(1, report(8, 1, 0, 3, {2, 2, 0, 0})).empty()) << "another command's report is dropped";
  EXPECT_TRUE(b.add(1, report(7, 2, 0, 3, {2, 2, 0, 0})).empty()) << "another epoch's report is dropped";
  EXPECT_TRUE(b.add(1, report(7, 1, 0, 3, {2, 2, 0, 0})).empty()) << "step 0 complete: streak 1 of 2";
  EXPECT_TRUE(b.add(1, report(7, 1, 1, 3, {2, 2, 0, 0})).empty());
  const auto ups = b.add(0, report(7, 1, 1, 3, {6, 0, 0, 0}));
  ASSERT_EQ(ups.size(), 1u);
  const auto& u = ups[0];
  EXPECT_EQ(u.epoch(), 1) << "placement version";
  EXPECT_EQ(u.layer(), 3);
  EXPECT_EQ(u.group_epoch(), 1);
  EXPECT_EQ(u.command_id(), 7);
  EXPECT_EQ(u.step(), 1);
  EXPECT_DOUBLE_EQ(u.max_over_mean_before(), 2.0);
  EXPECT_DOUBLE_EQ(u.max_over_mean_after(), 1.6);
  const auto p = actors::placement_of(u);
  EXPECT_EQ(p.ranks, 2);
  EXPECT_NE(p.native[0], p.native[1]) << "the two loaded experts end on different ranks";
  EXPECT_EQ(p.experts_of(0).size(), 2u);
  EXPECT_TRUE(b.add(0, report(7, 1, 0, 3, {6, 0, 0, 0})).empty()) << "a step already done is dropped";
  ASSERT_EQ(b.latest().size(), 1u);
  EXPECT_EQ(b.latest()[0].SerializeAsString(), u.SerializeAsString());
  // A new command starts over.
  b.reset(1, 2, 9);
  EXPECT_TRUE(b.latest().empty());
}

TEST(EpRebalance, PlacementMessagesRoundTripAndBadOnesAreRefused) {
  ep_placement p;
  p.ranks = 4;
  p.native = {3, 0, 1, 2, 0, 1, 2, 3};
  const auto u = actors::placement_update_of(p, 2, 5);
  EXPECT_EQ(u.epoch(), 5);
  EXPECT_EQ(u.layer(), 2);
  EXPECT_EQ(actors::placement_of(u).native, p.native);
  auto twice = u;
  twice.mutable_replicas(1)->set_expert(0);
  EXPECT_EQ(error_code_of([&] { actors::placement_of(twice); }), errc::invalid_argument);
  auto off = u;
  off.mutable_replicas(1)->set_rank(4);
  EXPECT_EQ(error_code_of([&] { actors::placement_of(off); }), errc::invalid_argument);
}

// ---- end to end: supervisor + 4 workers over loopback --------------------------------

namespace {

constexpr int kRanks = 4;
constexpr int64_t kTokens = 32;  // per rank per step

// Each rank's actor system (the middleman: messages cross loopback TCP as between processes).
struct node_config : caf::actor_system_config {
  node_config() {
    load<caf::io::middleman>();
    actors::add_control_messages(*this);
    set("scheduler.max-threads", size_t{1});
  }
};

runtime::model_config moe_config() {
  return runtime::parse_hf_config(
      R"({"model_type":"mixtral","vocab_size":17,"hidden_size":16,"intermediate_size":16,"num_hidden_layers":1,
          "num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":8,"num_experts_per_tok":2,
          "max_position_embeddings":16})",
      "ep_rebalance_test");
}

// Rank r's tokens of step s: x[:, 0] = 1 (a constant feature the router biases on), the rest N(0, 1).
std::vector<float> step_tokens(int64_t step, int rank, int64_t C) {
  std::mt19937 gen(static_cast<uint32_t>(1000 * step + rank + 7));
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(kTokens * C));
  for (int64_t n = 0; n < kTokens; ++n)
    for (int64_t c = 0; c < C; ++c) x[static_cast<size_t>(n * C + c)] = c == 0 ? 1.0f : d(gen);
  return x;
}

struct rank_result {
  std::vector<std::vector<float>> outputs;  // per step, (N, C)
  std::vector<double> max_over_mean;        // per step: native per-rank max/mean of the step's rows
  std::vector<int64_t> placement_version;   // per step: the version it ran with
  std::vector<std::vector<int64_t>> loads;  // per step: the group's rows per expert
  int64_t steps = 0, switches = 0;
  size_t bytes_sent = 0;
  std::vector<int> final_native;
  parallel::layer_params L;                 // this rank's shard at the end
  std::string error;
};

struct e2e_job {
  runtime::model_config cfg;
  parallel::layer_params full;  // every expert (read-only while the command runs)
  std::vector<std::unique_ptr<runtime::communicator>> comms;
  int64_t max_steps = 400;
  int64_t steps_after_switch = 6;
  std::array<rank_result, kRanks> out;
};

parallel::layer_params deep_copy(const parallel::layer_params& L) {
  parallel::layer_params c = L;
  auto cp = [](runtime::tensor& t) {
    if (t.defined()) t = t.clone();
  };
  cp(c.router_w);
  for (auto* set : {&c.expert_gate, &c.expert_up, &c.expert_down})
    for (auto& t : *set) cp(t);
  return c;
}

// The command every rank runs: standard-EP MoE forwards, loads reported after each step, the
// placement switched at a step boundary when the group agrees on a newer version.
void moe_loop(e2e_job& job, const control::Command&, actors::worker_context& ctx, control::StatsReport& rep) {
  namespace ep = parallel::ep;
  const int g = ctx.group_rank();
  auto& comm = *job.comms[static_cast<size_t>(g)];
  ctx.set_active(&comm);
  const auto& cfg = job.cfg;
  const int64_t C = cfg.hidden, E = cfg.n_experts;
  auto& res = job.out[static_cast<size_t>(g)];
  parallel::layer_params L = deep_copy(job.full);
  actors::expert_placement_state st{ep::ep_placement::contiguous(E, kRanks)};
  ep::ep_shard_layer(L, st.placement, g);
  ep::ep_context ectx;
  ectx.tokens = &comm;
  ectx.placement = st.placement;
  ectx.options.mode = ep::ep_mode::standard;
  int64_t stop_at = job.max_steps;
  for (int64_t step = 0; step < stop_at; ++step) {
    const auto x = step_tokens(step, g, C);
    std::vector<float> y(x.size());
    ep::ep_activations a;
    ep::ep_moe_forward(y.data(), a, x.data(), L, cfg, kTokens, ectx);
    res.outputs.push_back(std::move(y));
    res.max_over_mean.push_back(ectx.last.plan.max_over_mean());
    res.placement_version.push_back(st.version);
    res.loads.push_back(ectx.last.loads);
    std::vector<int64_t> mine(a.counts.begin() + g * E, a.counts.begin() + (g + 1) * E);  // my tokens' rows
    ctx.report_expert_loads(/*layer=*/0, step, mine);
    // Give the supervisor's answer time to arrive (bounded by max_steps; not asserted on).
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    if (actors::switch_expert_placement(ctx, comm, 0, st, ep::ep_expert_sets(L, cfg))) {
      ectx.placement = st.placement;
      stop_at = std::min(job.max_steps, step + 1 + job.steps_after_switch);  // same step on every rank
    }
  }
  ctx.set_active(nullptr);
  res.steps = static_cast<int64_t>(res.outputs.size());
  res.switches = st.switches;
  res.bytes_sent = st.bytes_sent;
  res.final_native = st.placement.native;
  res.L = std::move(L);
  rep.add_lines(fmt::format("rank {}: {} steps, placement v{}", g, res.steps, st.version));
}

double mean_of(const std::vector<double>& v, size_t begin, size_t end) {
  double s = 0;
  for (size_t i = begin; i < end; ++i) s += v[i];
  return s / static_cast<double>(end - begin);
}

}  // namespace

TEST(EpRebalanceEndToEnd, HotExpertsOnRankZeroAreSpreadAndOutputsStayBitwiseEqual) {
  e2e_job job;
  job.cfg = moe_config();
  const int64_t C = job.cfg.hidden, E = job.cfg.n_experts;
  {
    auto w = parallel::model_weights::random_init(job.cfg, /*seed=*/11);
    job.full = deep_copy(w.layers[0]);
  }
  // Skew: the router adds bias_e * x[:, 0] (x[:, 0] = 1); experts 0 and 1 (both native on rank 0)
  // are hot, 2 and 3 (rank 1) warm, the rest cold.
  const float bias[8] = {2.5f, 2.0f, 1.0f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f};
  float* rw = job.full.router_w.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 1; c < C; ++c) rw[e * C + c] *= 20.0f;  // std 0.4: tokens still differ
    rw[e * C + 0] = bias[e];
  }
  job.comms = runtime::make_inproc_group(kRanks, 30000);

  actors::supervisor_options so;
  so.world_size = kRanks;
  so.cluster_token = "rebalance-token";
  so.heartbeat_interval_ms = 100;
  so.heartbeat_timeout_ms = 5000;
  so.join_timeout_ms = 20000;
  so.experts.decay = 0.5;
  so.experts.threshold = 1.3;
  so.experts.patience = 3;
  so.experts.cooldown = 1000;  // one change in this test
  so.experts.min_improvement = 0.1;

  // One actor system per rank; torn down in cluster_node's order (workers, supervisor, systems).
  struct nodes {
    std::vector<std::unique_ptr<node_config>> cfgs;
    std::vector<std::unique_ptr<caf::actor_system>> systems;
    caf::actor sup;
    std::vector<std::unique_ptr<actors::worker>> workers;
    ~nodes() {
      workers.clear();
      if (sup) caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
      while (!systems.empty()) systems.pop_back();
    }
  } n;
  auto& systems = n.systems;
  auto& workers = n.workers;
  for (int r = 0; r < kRanks; ++r) {
    n.cfgs.push_back(std::make_unique<node_config>());
    systems.push_back(std::make_unique<caf::actor_system>(*n.cfgs.back()));
  }
  n.sup = actors::spawn_supervisor(*systems[0], so);
  const caf::actor sup = n.sup;
  auto port = systems[0]->middleman().publish(sup, 0, "127.0.0.1");
  ASSERT_TRUE(port) << systems[0]->render(port.error());
  for (int r = 0; r < kRanks; ++r) {
    actors::worker_options wo;
    wo.rank = r;
    wo.world_size = kRanks;
    wo.cluster_token = so.cluster_token;
    wo.host = "test";
    workers.push_back(std::make_unique<actors::worker>(*systems[static_cast<size_t>(r)], wo));
    workers.back()->on(Command::COLLECTIVE_LOOP,
                       [&job](const Command& c, actors::worker_context& ctx, control::StatsReport& rep) {
                         moe_loop(job, c, ctx, rep);
                       });
    caf::actor handle = sup;
    if (r > 0) {
      auto remote = systems[static_cast<size_t>(r)]->middleman().remote_actor("127.0.0.1", *port);
      ASSERT_TRUE(remote) << systems[static_cast<size_t>(r)]->render(remote.error());
      handle = *remote;
    }
    workers.back()->join(handle);
  }
  actors::supervisor_client driver(*systems[0], sup);
  ASSERT_EQ(driver.wait_for_group(20000).members_size(), kRanks);
  Command cmd;
  cmd.set_id(42);
  cmd.set_kind(Command::COLLECTIVE_LOOP);
  const auto reports = driver.run(cmd, 60000);
  const auto placements = driver.placements();
  driver.shutdown("test done", 0);
  for (auto& w : workers) EXPECT_EQ(w->wait(), 0);
  ASSERT_EQ(reports.size(), static_cast<size_t>(kRanks));
  for (const auto& r : reports) ASSERT_TRUE(r.ok()) << r.error();

  // The supervisor changed the placement once, with the numbers it predicted from the EMA.
  ASSERT_EQ(placements.size(), 1u);
  const auto& u = placements[0];
  EXPECT_EQ(u.epoch(), 1);
  EXPECT_EQ(u.step(), so.experts.patience - 1) << "imbalanced from step 0: fires at the patience-th step";
  const auto target = actors::placement_of(u);
  std::printf("supervisor: placement v%lld after step %lld: EMA max/mean %.3f -> %.3f (predicted); native [",
              static_cast<long long>(u.epoch()), static_cast<long long>(u.step()), u.max_over_mean_before(),
              u.max_over_mean_after());
  for (int r : target.native) std::printf(" %d", r);
  std::printf(" ]\n");
  std::fflush(stdout);
  EXPECT_LT(u.max_over_mean_after(), u.max_over_mean_before() * (1 - so.experts.min_improvement));
  // ... which are exactly what one tracker over the group's loads predicts (the 4 ranks' EMAs of
  // their own tokens, summed by the supervisor; dyadic decay and integer loads: exact).
  {
    ep_load_tracker group(E, so.experts.decay);
    for (int64_t s = 0; s <= u.step(); ++s) group.observe(job.out[0].loads[static_cast<size_t>(s)]);
    const auto contiguous = ep_placement::contiguous(E, kRanks);
    const auto expect = ep_rebalance_propose(group.ema(), contiguous);
    EXPECT_EQ(u.max_over_mean_before(), expect.before);
    EXPECT_EQ(u.max_over_mean_after(), expect.after);
    EXPECT_EQ(target.native, expect.placement.native);
  }

  // Every rank ran the same steps, switched once at the same step, and ended on `target`.
  const auto& r0 = job.out[0];
  for (int g = 0; g < kRanks; ++g) {
    const auto& res = job.out[static_cast<size_t>(g)];
    EXPECT_EQ(res.steps, r0.steps) << "rank " << g;
    EXPECT_EQ(res.switches, 1) << "rank " << g;
    EXPECT_EQ(res.placement_version, r0.placement_version) << "rank " << g << " switched at another step";
    EXPECT_EQ(res.final_native, target.native) << "rank " << g;
  }
  const auto first_new = std::find(r0.placement_version.begin(), r0.placement_version.end(), 1);
  ASSERT_NE(first_new, r0.placement_version.end()) << "no switch within " << job.max_steps << " steps";
  const size_t sw = static_cast<size_t>(first_new - r0.placement_version.begin());
  EXPECT_EQ(r0.steps, static_cast<int64_t>(sw) + job.steps_after_switch);

  // The per-rank max/mean of the actual rows (standard EP: native placement) fell.
  const double before = mean_of(r0.max_over_mean, 0, sw);
  const double after = mean_of(r0.max_over_mean, sw, r0.max_over_mean.size());
  const auto split = r0.max_over_mean.begin() + static_cast<long>(sw);
  const double worst_after = *std::max_element(split, r0.max_over_mean.end());
  const double best_before = *std::min_element(r0.max_over_mean.begin(), split);
  std::printf("per-rank max/mean of the rows: %.3f before (%zu steps, best %.3f), %.3f after (%zu steps, worst "
              "%.3f); switched before step %zu; %zu bytes of expert weights sent\n",
              before, sw, best_before, after, r0.max_over_mean.size() - sw, worst_after, sw,
              [&] {
                size_t b = 0;
                for (const auto& res : job.out) b += res.bytes_sent;
                return b;
              }());
  std::fflush(stdout);
  EXPECT_LT(worst_after, best_before) << "every step after the switch is better balanced than any before";
  EXPECT_LT(after, 0.75 * before);

  // Outputs of every step: bitwise the single-rank layer on the 4 ranks' tokens, concatenated.
  int64_t mismatched = 0;
  for (int64_t s = 0; s < r0.steps; ++s) {
    std::vector<float> xcat, ref(static_cast<size_t>(kRanks * kTokens * C));
    for (int g = 0; g < kRanks; ++g) {
      const auto x = step_tokens(s, g, C);
      xcat.insert(xcat.end(), x.begin(), x.end());
    }
    parallel::moe_activations a;
    parallel::moe_forward(ref.data(), a, xcat.data(), job.full, job.cfg, kRanks * kTokens);
    for (int g = 0; g < kRanks; ++g) {
      const auto& y = job.out[static_cast<size_t>(g)].outputs[static_cast<size_t>(s)];
      mismatched += std::memcmp(y.data(), ref.data() + g * kTokens * C, y.size() * sizeof(float)) != 0;
    }
  }
  EXPECT_EQ(mismatched, 0) << "(rank, step) outputs differing from the single-rank layer";

  // Each expert's weights live on its new rank only, bitwise the original.
  for (int g = 0; g < kRanks; ++g) {
    const auto& L = job.out[static_cast<size_t>(g)].L;
    for (int64_t e = 0; e < E; ++e) {
      const bool mine = target.native[static_cast<size_t>(e)] == g;
      const std::vector<std::pair<const runtime::tensor*, const runtime::tensor*>> sets = {
          {&L.expert_gate[static_cast<size_t>(e)], &job.full.expert_gate[static_cast<size_t>(e)]},
          {&L.expert_up[static_cast<size_t>(e)], &job.full.expert_up[static_cast<size_t>(e)]},
          {&L.expert_down[static_cast<size_t>(e)], &job.full.expert_down[static_cast<size_t>(e)]}};
      for (const auto& [have, want] : sets) {
        ASSERT_EQ(have->defined(), mine) << "rank " << g << " expert " << e;
        if (mine) {
          EXPECT_EQ(std::memcmp(have->data<float>(), want->data<float>(), static_cast<size_t>(want->numel()) * 4), 0)
              << "rank " << g << " expert " << e;
        }
      }
    }
  }
}
