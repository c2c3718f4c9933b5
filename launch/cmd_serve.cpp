// `troupe serve serve.yaml [--set key=value ...]`: serves a HF checkpoint over an OpenAI-compatible
// HTTP API (127.0.0.1 by default) until SIGINT / SIGTERM, on engine.ranks worker ranks.
//
//   troupe serve examples/serve_moe/serve.yaml --set server.port=0           # one rank; prints the port
//   troupe-launch -n 2 -- troupe serve examples/serve_moe/serve.yaml --set engine.ranks=2
//
// Every rank is a worker actor of the cluster (actors/cluster.h) and runs the SERVE command. Each
// holds the dense weights and its share of the experts (ep_shard_weights, native placement
// contiguous). Rank 0 hosts the scheduler actor (actors/serve_scheduler.h) and the HTTP server. Two
// layouts (engine.attention):
//   * data_parallel (default): every rank runs its own engine over its own requests and KV cache;
//     rank 0 dispatches each request to a rank and steps the group in lockstep
//     (elastic/scale/dp_group.h); the MoE layers send each rank's rows to their experts' ranks.
//   * replicated: every rank runs rank 0's batch on a replica of its KV cache
//     (elastic/engine/executor.h); the MoE layers take a slice of the batch each.
//
// Elastic (more processes than engine.ranks, e.g. troupe-launch --min-ranks 1 --max-ranks 4): the
// group starts on ranks [0, engine.ranks) and the other processes wait as standby; POST
// /admin/scale (server.admin_key) or `troupe scale URL --ranks M` grows or shrinks it while it
// serves (elastic/scale/dp_group.h invariant 7, dp_member.h): weights move peer-to-peer over UCX,
// a rank that leaves is standby again. Every communicator is UCX then. With troupe-launch
// --open-slots N, processes started elsewhere (troupe-launch --join HOST:PORT, the cluster token)
// join the running group and wait as standby too (dp_member.h invariant 10).
//
// Signals: rank 0 stops on SIGINT / SIGTERM (the HTTP server first, then the scheduler: requests
// left end with "abort", the other ranks are told to stop and return). The other ranks wait for
// that (troupe-launch and mpirun signal every rank). A second signal exits at once on any rank.
// Rank 0 also stops when the group ends (a rank lost) or breaks mid-step.
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iterator>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/expert_balancer.h"
#include "actors/serve_scheduler.h"
#include "elastic/engine/engine.h"
#include "elastic/engine/executor.h"
#include "elastic/server/engine_backend.h"
#include "elastic/scale/dp_group.h"
#include "elastic/scale/dp_autoscaler.h"
#include "elastic/scale/dp_member.h"
#include "elastic/server/openai_api.h"
#include "elastic/server/http_server.h"
#include "launch/cluster_setup.h"
#include "launch/commands.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/ep/ep_serve_runner.h"
#include "parallel/ep/ep_shard.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "runtime/error.h"
#include "runtime/io/hf_config.h"
#include "runtime/log.h"
#include "runtime/serve_spec.h"
#include "runtime/bootstrap.h"
#include "runtime/communicator_ucx.h"
#include "runtime/threads.h"

namespace troupe::launch {

namespace {

using control::Command;
using runtime::errc;

struct serve_options {
  std::string spec;
  std::vector<std::string> sets;
  int threads = 0;
  std::string backend = "auto";
  int join_timeout_ms = 60000;
  int heartbeat_timeout_ms = 10000;
  int min_ranks = 1;  // an elastic group's least size (TROUPE_MIN_RANKS from troupe-launch)
  bool elastic = false;  // more processes than engine.ranks, or started by troupe-launch --max-ranks
  int open_slots = 0;    // processes that may join from outside (TROUPE_OPEN_SLOTS: troupe-launch --open-slots)
};

// A quarter of MemAvailable (/proc/meminfo), at most 4 GiB, shared by the ranks on this host: the
// KV cache when none is given.
size_t auto_kv_bytes(int local_ranks) {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kib = 0, avail = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") avail = kib * 1024;
  if (avail == 0) avail = size_t{1} << 30;
  return std::min(avail / 4, size_t{4} << 30) / static_cast<size_t>(std::max(local_ranks, 1));
}

// SIGINT / SIGTERM set a flag (a handler, not a blocked mask: threads made before main(), such as
// OpenBLAS's, would still take the default action). Rank 0 polls it once it serves (a signal during
// the start is acted on as soon as it does); the other ranks wait for rank 0 to end the group. A
// second signal exits at once on any rank.
std::atomic<int> g_signals{0};
std::atomic<int> g_last_signal{0};

static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free atomic");

void on_stop_signal(int sig) {
  g_last_signal.store(sig);
  if (g_signals.fetch_add(1) >= 1) std::_Exit(128 + sig);  // a second signal: now, on every rank
}

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

elastic::engine_options engine_options_from(const serve::ServeSpec& spec) {
  elastic::engine_options eo;
  eo.max_batch_tokens = spec.engine().max_batch_tokens();
  eo.max_running = spec.engine().max_running();
  eo.max_waiting = spec.engine().max_waiting();
  eo.prefix_caching = spec.engine().prefix_caching();
  eo.static_batching = spec.engine().batching() == "static";
  return eo;
}

// What rank 0 serves through: its engine, what steps it (the engine, or a data-parallel group's
// leader), the metrics the server shows, and whether the group broke ("" while whole).
struct serving {
  elastic::engine& eng;
  elastic::step_driver& driver;
  std::function<std::string()> metrics;
  std::function<std::string()> broken;
  int ranks = 1;
  std::string layout;
  elastic::dp_leader* elastic = nullptr;  // an elastic group's leader: /admin/scale
  int min_ranks = 1;                      // ... and the least size its autoscaler may choose
  std::function<void(int)> on_lost;       // ... and what a lost member (launcher rank) means to it
  int open_slots = 0;                     // ... and how many processes may join it from outside
};

// /admin/scale over the data-parallel group's leader.
class group_scale_admin final : public elastic::scale_admin {
 public:
  group_scale_admin(elastic::dp_leader& l, actors::serve_scheduler_client& sched) : leader_(l), sched_(sched) {}
  std::string request_scale(int64_t ranks) override {
    try {
      leader_.request_scale(static_cast<int>(std::clamp<int64_t>(ranks, -1, 1 << 20)));
    } catch (const elastic::dp_scale_refused& e) {
      throw elastic::api_error(e.status(), e.status() == 409 ? "conflict_error" : "invalid_request_error", e.what(),
                               "ranks");
    }
    sched_.wake();  // the change starts at the next iteration boundary, idle or not
    return scale_status();
  }
  std::string scale_status() override {
    const elastic::dp_scale_status s = leader_.scale_status();
    nlohmann::json j = {{"ranks", s.ranks},
                        {"target", s.target},
                        {"state", s.state},
                        {"layout", s.epoch},
                        {"pool_ranks", s.pool_ranks},
                        {"scale_ups", s.scale_ups},
                        {"scale_downs", s.scale_downs},
                        {"moved_samples", s.moved_samples},
                        {"recoveries", s.recoveries},
                        {"abandoned", s.abandoned},
                        {"lost_ranks", s.lost_ranks},
                        {"last_recovery_seconds", s.last_recovery_seconds},
                        {"last_seconds",
                         {{"wait", s.last_wait_seconds},
                          {"move", s.last_move_seconds},
                          {"switch", s.last_switch_seconds},
                          {"total", s.last_total_seconds}}}};
    if (!s.error.empty()) j["error"] = s.error;
    return j.dump();
  }

 private:
  elastic::dp_leader& leader_;
  actors::serve_scheduler_client& sched_;
};

// Rank 0: the scheduler actor and the HTTP server, until a signal or the group's end.
void lead(actors::worker_context& ctx, control::StatsReport& rep, const serve::ServeSpec& spec,
          const parallel::model_weights& w, const parallel::text_tokenizer& tok, const serving& sv) {
  // (w: rank 0's weights; an elastic group's rank 0 keeps its dense weights through every change)
  elastic::engine& eng = sv.eng;
  actors::serve_scheduler_client sched(ctx.system(), sv.driver);
  // A member lost (an elastic group goes on without it: dp_group.h invariant 8): the scheduler steps
  // at once, idle or not, and the next step rebuilds the group.
  struct lost_guard {
    actors::worker_context& ctx;
    ~lost_guard() { ctx.on_member_lost(nullptr); }
  } lost_hook{ctx};
  if (sv.on_lost)
    ctx.on_member_lost([&sv, &sched](int rank, const std::string&) {
      sv.on_lost(rank);
      sched.wake();
    });
  const std::string name = spec.served_model_name().empty()
                               ? std::filesystem::path(spec.model()).lexically_normal().filename().string()
                               : spec.served_model_name();
  elastic::engine_backend backend(eng, tok, name.empty() ? "model" : name, static_cast<uint64_t>(spec.seed()),
                                  &sched);
  // engine.autoscale: rank 0 resizes an elastic group by load (elastic/scale/dp_autoscaler.h).
  std::unique_ptr<elastic::dp_autoscaler> autoscaler;
  const auto& as = spec.engine().autoscale();
  if (sv.elastic && as.enabled()) {
    elastic::autoscale_options ao;
    ao.min_ranks = sv.min_ranks;
    ao.max_ranks = sv.elastic->scale_status().pool_ranks + sv.open_slots;  // bounded by obs.able as well
    ao.ttft_slo_s = static_cast<double>(as.ttft_slo_ms()) / 1000.0;
    ao.queue_per_rank = as.queue_per_rank();
    ao.shrink_below = as.shrink_below();
    ao.patience = as.patience();
    ao.cooldown_ms = as.cooldown_ms();
    const int64_t experts = w.config().is_moe() ? w.config().n_experts : 0;
    autoscaler = std::make_unique<elastic::dp_autoscaler>(
        ao, [experts](int r) { return experts == 0 || experts % r == 0; });
  }
  if (sv.metrics)
    backend.set_metrics([&sv, &autoscaler] { return sv.metrics() + (autoscaler ? autoscaler->metrics_text() : ""); });
  elastic::http_options ho;
  ho.host = spec.server().host();
  ho.port = static_cast<int>(spec.server().port());
  ho.api_key = runtime::serve_api_key(spec);
  ho.io_threads = static_cast<int>(spec.server().threads());
  ho.max_connections = static_cast<int>(std::min<int64_t>(spec.server().max_connections(), 1 << 30));
  ho.idle_timeout_ms = static_cast<int>(std::min<int64_t>(spec.server().idle_timeout_ms(), 1 << 30));
  ho.limits.max_body_bytes = static_cast<size_t>(runtime::serve_max_body_bytes(spec));
  ho.limits.max_tokens = spec.server().max_tokens();
  ho.limits.max_prompt_tokens = spec.server().max_prompt_tokens() > 0 ? spec.server().max_prompt_tokens()
                                                                      : w.config().max_position_embeddings - 1;
  ho.admin_key = runtime::serve_admin_key(spec);
  std::unique_ptr<group_scale_admin> admin;
  if (sv.elastic) admin = std::make_unique<group_scale_admin>(*sv.elastic, sched);
  ho.admin = admin.get();
  elastic::http_server server(backend, ho);
  server.start();
  const int P = sv.ranks;
  fmt::print("troupe serve: {} ({}, {} parameters) on http://{}:{} — {} rank(s){}, {} KV blocks of {} tokens{}, {} "
             "batching{}\n",
             name, runtime::model_family_name(w.config().family), total_parameters(w.config()), ho.host,
             server.port(), P,
             P > 1 && w.config().is_moe() ? fmt::format(" (experts {} per rank, {})", w.config().n_experts / P,
                                                        parallel::ep::ep_mode_name(
                                                            parallel::ep::ep_options_from(spec.expert()).mode))
                                          : std::string(),
             eng.num_blocks(), eng.options().block_size, P > 1 || sv.elastic ? fmt::format(" per rank, {}", sv.layout) : "",
             eng.options().static_batching ? "static" : "continuous", ho.api_key.empty() ? "" : ", API key required");
  std::fflush(stdout);
  std::string why;
  const auto t_start = std::chrono::steady_clock::now();
  int64_t next_look_ms = 0;
  for (;;) {
    if (autoscaler) {
      const int64_t now_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t_start).count();
      if (now_ms >= next_look_ms) {
        next_look_ms = now_ms + as.interval_ms();
        const auto sum = sv.elastic->summary();
        const auto st = sv.elastic->scale_status();
        elastic::autoscale_observation obs;
        obs.now_ms = now_ms;
        obs.ranks = st.ranks;
        obs.changing = st.state == "pending" || st.state == "moving";
        obs.able = st.pool_ranks;
        obs.waiting = sum.gauges.waiting;
        obs.kv_usage = sum.gauges.kv_usage;
        obs.ttft = sum.ttft;
        if (const auto d = autoscaler->observe(obs)) {
          try {
            sv.elastic->request_scale(d->ranks);
            sched.wake();
            runtime::log::info("serve: autoscaler: {} -> {} ranks ({})", st.ranks, d->ranks, d->reason);
          } catch (const std::exception& e) {
            runtime::log::warn("serve: autoscaler: {} ranks refused: {}", d->ranks, e.what());
          }
        }
      }
    }
    if (g_signals.load() > 0) {
      why = fmt::format("signal {}", g_last_signal.load());
      break;
    }
    if (ctx.group_over()) {
      why = "the group ended";
      break;
    }
    const std::string broke = sv.broken ? sv.broken() : std::string();
    if (!broke.empty()) {  // a rank left mid-step: every later step would fail
      why = "the group broke: " + broke;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  runtime::log::info("serve: {}: stopping", why);
  server.stop();
  sched.stop();  // the driver's shutdown: aborts what is left, tells the other ranks to stop
  const auto st = eng.stats();
  fmt::print("troupe serve: stopped; rank 0: {} requests finished, {} aborted, {} tokens generated, prefix hit rate "
             "{:.3f}\n",
             st.finished, st.aborted, st.generated_tokens, st.kv.hit_rate());
  std::fflush(stdout);
  rep.add_lines(fmt::format("rank 0: {} requests, {} tokens generated, {} iterations", st.finished,
                            st.generated_tokens, st.iterations));
  TROUPE_CHECK(why != "the group ended", errc::aborted, "rank 0: serving stopped: the group ended (a rank was lost)");
  TROUPE_CHECK(why.rfind("the group broke", 0) != 0, errc::aborted, "rank 0: serving stopped: {}", why);
}

constexpr int tag_group_boot = 20113;  // a new layout's communicator addresses, over the pool

// What the pool's members publish through the supervisor (actors/supervisor.h invariant 9), so that a
// process joining from outside finds them and rank 0 learns it may take it in.
constexpr const char* key_pool = "serve.pool";        // a member's two pool worker addresses
constexpr const char* key_blocks = "serve.kv_blocks";  // rank 0: KV blocks per rank, the model's fingerprint
constexpr const char* key_standby = "serve.standby";   // a joined process waits as standby

std::string pack_addresses(const std::string& a, const std::string& b) {
  return fmt::format("{}:", a.size()) + a + b;
}
std::string unpack_address(const std::string& blob, int which, int rank) {
  const size_t colon = blob.find(':');
  size_t n = 0;
  const bool ok = colon != std::string::npos && colon > 0 &&
                  std::from_chars(blob.data(), blob.data() + colon, n).ec == std::errc() && colon + 1 + n <= blob.size();
  TROUPE_CHECK(ok, errc::io, "rank {}'s pool addresses are malformed ({} bytes)", rank, blob.size());
  return which == 0 ? blob.substr(colon + 1, n) : blob.substr(colon + 1 + n);
}

// An elastic group (more processes than engine.ranks, or open to processes joining from outside):
// the pool of every process over UCX, each rank's dp_member, standby ranks waiting to be taken in
// (dp_member.h). Pool rank = launcher rank: a group that keeps its members is never renumbered, and a
// process that joins late gets the next rank (actors/supervisor.h invariant 8).
void run_serve_elastic(actors::worker_context& ctx, control::StatsReport& rep, const serve::ServeSpec& spec,
                       const rank_info& r, const parallel::text_tokenizer& tok, const serve_options& opts) {
  const int rank = ctx.rank();
  const bool late = r.late_join;
  if (late) runtime::log::set_rank(rank);
  TROUPE_CHECK(ctx.group_rank() == rank, errc::internal, "rank {} is group rank {}: an elastic pool is never renumbered",
               rank, ctx.group_rank());
  const int first = static_cast<int>(spec.engine().ranks());
  const int min_ranks = opts.min_ranks;
  // The pool waits as long as the service lives (a standby rank may wait days); a lost process is
  // found by the supervisor's heartbeats, which abort it. The weights of a change move on a second
  // one, on a thread of their own, while the rank serves (used only during a change, so it may spin:
  // UCX keeps its fastest transports, e.g. cma). A process that joined later is met through what it
  // published (runtime/communicator_ucx.h invariant 9).
  auto make_pool = [&](const std::string& name, int which, int timeout_ms, bool sleep_when_idle) {
    runtime::ucx_options uo;
    uo.timeout_ms = timeout_ms;
    uo.sleep_when_idle = sleep_when_idle;
    uo.resolve_peer = [&ctx, which](int peer) {
      return unpack_address(ctx.lookup(key_pool, peer, 60000), which, peer);
    };
    if (late) return runtime::make_ucx_joining_communicator(rank, uo);
    std::vector<int> all(static_cast<size_t>(ctx.group_size()));
    for (int i = 0; i < ctx.group_size(); ++i) all[static_cast<size_t>(i)] = i;
    auto world = ctx.bootstrap(name);
    auto boot = runtime::make_subgroup_bootstrap(*world, all);
    return runtime::make_ucx_communicator(*boot, uo);
  };
  std::unique_ptr<runtime::ucx_communicator> pool =
      make_pool("pool", 0, std::numeric_limits<int>::max(), /*sleep_when_idle=*/true);
  std::unique_ptr<runtime::ucx_communicator> xfer = make_pool("pool_moves", 1, 300000, false);
  elastic::dp_comm_factory factory = [](runtime::communicator& via, const std::vector<int>& members,
                                        const std::string& name) {
    auto boot = runtime::make_comm_bootstrap(via, members, tag_group_boot);
    runtime::ucx_options uo;
    uo.timeout_ms = 600000;
    uo.sleep_when_idle = name.rfind("serve.", 0) == 0;  // the serving group waits long when idle
    return std::unique_ptr<runtime::communicator>(runtime::make_ucx_communicator(*boot, uo));
  };
  // A change's own communicator (dp_member.h invariant 11): each of its ranks makes it alone and
  // publishes its address; the others look it up when they first send (a lost rank's lookup fails).
  elastic::dp_moves_factory moves = [&ctx, rank](const std::string& name) {
    runtime::ucx_options uo;
    uo.timeout_ms = 300000;
    const std::string key = "serve." + name;
    uo.resolve_peer = [&ctx, key](int peer) { return ctx.lookup(key, peer, 60000); };
    auto c = runtime::make_ucx_joining_communicator(rank, uo);
    ctx.publish(key, c->address());
    return std::unique_ptr<runtime::communicator>(std::move(c));
  };
  elastic::dp_member m(*pool, *xfer, factory, parallel::ep::ep_options_from(spec.expert()),
                       elastic::dp_weight_memory_from(spec.engine().weight_memory()), moves);
  struct active_set {  // the worker aborts these when the cluster's group ends
    actors::worker_context& ctx;
    ~active_set() { ctx.set_active(nullptr); }
  } guard{ctx};
  auto register_active = [&] {
    std::vector<runtime::communicator*> cs{pool.get(), xfer.get()};
    if (m.active()) cs.push_back(&m.comm());
    ctx.set_active(cs);
    ctx.set_loss_comms(m.watched(), m.group_comms());
  };
  register_active();
  // A lost process (the supervisor keeps the group: actors/supervisor.h invariant 7) is never taken in
  // again; when it served, the group's communicators are aborted and the survivors rebuild the group
  // (dp_group.h invariant 8). A process that joined from outside is taken in once it says it waits.
  struct hooks_guard {  // cleared before the member goes
    actors::worker_context& ctx;
    ~hooks_guard() {
      ctx.on_member_lost(nullptr);
      ctx.on_published(nullptr);
      ctx.set_loss_comms({}, {});
    }
  } hooks{ctx};
  ctx.on_member_lost([&m](int lost, const std::string&) { m.mark_lost(lost); });
  if (rank == 0)
    ctx.on_published([&m](const std::string& key, int from, const std::string&) {
      if (key == key_standby) {
        m.add_standby(from);
        runtime::log::info("serve: rank {} joined from outside and waits as standby ({} processes able to serve)",
                           from, m.pool_alive());
      }
    });
  ctx.publish(key_pool, pack_addresses(pool->address(), xfer->address()));
  const runtime::model_config mc = runtime::load_hf_config(spec.model() + "/config.json");
  const int64_t kv = runtime::serve_kv_cache_bytes(spec);
  const size_t kv_bytes = kv > 0 ? static_cast<size_t>(kv) : auto_kv_bytes(r.local_world_size);
  const int64_t bs = spec.engine().block_size();
  const int64_t mine = parallel::paged_kv_store::blocks_for_budget(mc, bs, kv_bytes);
  // What rank 0 serves: the model's config.json, fingerprinted (FNV-1a 64): a joiner with another
  // model is refused before any weight moves.
  std::string config_text;
  {
    std::ifstream in(spec.model() + "/config.json", std::ios::binary);
    config_text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  uint64_t fnv = 1469598103934665603ull;
  for (unsigned char ch : config_text) fnv = (fnv ^ ch) * 1099511628211ull;
  const std::string fingerprint = fmt::format("{:016x}", fnv);
  int64_t blocks = 0;
  if (late) {  // the group's ranks all hold as many blocks; this process must hold as many
    std::istringstream b(ctx.lookup(key_blocks, 0, 60000));
    std::string theirs;
    b >> blocks >> theirs;
    TROUPE_CHECK(theirs == fingerprint, errc::invalid_argument,
                 "rank {}: {}/config.json (fingerprint {}) is not the model the running group serves (fingerprint "
                 "{}): start this process with the group's serve file and model",
                 rank, spec.model(), fingerprint, theirs);
    TROUPE_CHECK(mine >= blocks, errc::invalid_argument,
                 "rank {}: its KV cache budget ({} bytes) holds {} blocks of {} tokens, but every rank of the group "
                 "holds {}: raise engine.kv_cache_memory on this host",
                 rank, kv_bytes, mine, bs, blocks);
  } else {  // every process of the pool may serve: the group's KV cache is the pool's minimum
    blocks = elastic::agree_num_blocks(*pool, mine);
    if (rank == 0) ctx.publish(key_blocks, fmt::format("{} {}", blocks, fingerprint));
  }
  TROUPE_CHECK(blocks >= 1, errc::invalid_argument,
               "rank {}: some rank's KV cache budget holds no block of {} tokens; raise engine.kv_cache_memory", rank,
               bs);
  elastic::engine_options eo = engine_options_from(spec);
  eo.group_member = true;
  eo.block_size = bs;
  elastic::dp_elastic el = m.elastic();
  const auto check = el.check;
  el.check = [check, min_ranks](int ranks) {
    TROUPE_CHECK(ranks >= min_ranks, errc::invalid_argument, "{} ranks is below the group's minimum of {} (--min-ranks)",
                 ranks, min_ranks);
    check(ranks);
  };
  m.on_layout = register_active;  // each switch registers the new communicators before the old ones go
  if (late || rank >= first) m.start_standby_from(spec.model(), mc);
  else m.load(spec.model(), first);
  register_active();
  if (late) ctx.publish(key_standby, "");
  if (rank != 0) {
    const auto sum = elastic::dp_serve_follower(m, tok, eo, blocks, el);
    rep.add_lines(fmt::format("rank {}: {} lockstep iterations, taken in {} time(s) from standby{}", rank, sum.steps,
                              sum.joins, late ? " (joined from outside)" : ""));
    return;
  }
  elastic::local_executor exec(m.decoder(), blocks, bs);
  elastic::engine eng(exec, tok, eo);
  elastic::dp_leader leader(eng, m.comm(), elastic::make_dp_dispatch(spec.engine().dispatch(), first, bs), {}, el);
  serving sv{eng,
             leader,
             [&] { return leader.metrics_text(); },
             [&] { return leader.broken() ? leader.broken_reason() : std::string(); },
             first,
             fmt::format("data-parallel attention, dispatch {}, elastic: {} processes{}, at least {} serving",
                         leader.policy().name(), ctx.group_size(),
                         opts.open_slots > 0 ? fmt::format(" + {} open slot(s)", opts.open_slots) : std::string(),
                         min_ranks),
             &leader,
             min_ranks,
             [&m](int lost) { m.mark_lost(lost); },
             opts.open_slots};
  lead(ctx, rep, spec, m.weights(), tok, sv);
  const auto st = leader.scale_status();
  rep.add_lines(fmt::format("rank 0: {} scale-ups, {} scale-downs, {} samples moved", st.scale_ups, st.scale_downs,
                            st.moved_samples));
}

// One rank's part, on the worker's compute thread.
void run_serve(actors::worker_context& ctx, control::StatsReport& rep, const serve::ServeSpec& spec,
               const serve_options& o, const rank_info& r) {
  const int rank = ctx.group_rank(), world = ctx.group_size();
  std::string backend = o.backend;
  if (backend == "auto") backend = mpi_session_of_process() ? "mpi" : "ucx";
  // What can fail on one rank alone comes before the first collective, the same on every rank:
  // the tokenizer (rank 0 needs it; every rank loads it so a bad file fails everywhere at once).
  std::unique_ptr<parallel::text_tokenizer> tok =
      parallel::load_tokenizer(spec.tokenizer().empty() ? spec.model() : spec.tokenizer());
  if (o.elastic) {
    run_serve_elastic(ctx, rep, spec, r, *tok, o);
    return;
  }
  // The MoE layers' tokens (and the steps from rank 0) on one communicator, borrowed expert weights
  // on a second one beside it (ep_layer.h). A 10-minute timeout per operation: a quiet server's
  // group hears a keepalive every 5 s, a dead rank is found by the supervisor's heartbeats.
  std::unique_ptr<runtime::communicator> epc, epw;
  if (world > 1) {
    std::vector<int> all(static_cast<size_t>(world));
    for (int i = 0; i < world; ++i) all[static_cast<size_t>(i)] = i;
    epc = make_subgroup_comm(backend, ctx, all, 0, "serve", 600000, /*sleep_when_idle=*/true);
    epw = make_subgroup_comm(backend, ctx, all, 0, "serve_weights", 600000);
  }
  active_guard guard(ctx, {epc.get(), epw.get()});
  parallel::model_weights w = parallel::model_weights::load(spec.model());
  std::unique_ptr<parallel::ep::ep_serve_runner> moe;
  if (w.config().is_moe()) {
    if (world > 1) {
      parallel::ep::ep_context c;
      c.tokens = epc.get();
      c.weights = epw.get();
      c.placement = parallel::ep::ep_placement::contiguous(w.config().n_experts, world);
      c.options = parallel::ep::ep_options_from(spec.expert());
      parallel::ep::ep_shard_weights(w, c.placement, rank);
      moe = std::make_unique<parallel::ep::ep_serve_runner>(
          std::move(c), spec.engine().attention() == "data_parallel" ? parallel::ep::ep_serve_layout::data_parallel
                                                                     : parallel::ep::ep_serve_layout::replicated);
    } else {
      moe = std::make_unique<parallel::ep::ep_serve_runner>();
    }
  }
  parallel::decoder dec(w);
  if (moe) dec.set_expert_parallel(moe.get());
  const int64_t kv = runtime::serve_kv_cache_bytes(spec);
  const size_t kv_bytes = kv > 0 ? static_cast<size_t>(kv) : auto_kv_bytes(r.local_world_size);
  const int64_t bs = spec.engine().block_size();
  const int64_t blocks = parallel::paged_kv_store::blocks_for_budget(w.config(), bs, kv_bytes);
  TROUPE_CHECK(world > 1 || blocks >= 1, errc::invalid_argument,  // a group checks the agreed minimum
               "rank {}: a KV cache of {} bytes holds no block of {} tokens ({} bytes each); raise "
               "engine.kv_cache_memory",
               rank, kv_bytes, bs, parallel::paged_kv_store::bytes_per_block(w.config(), bs));
  // expert.rebalance: every rank reports each step's loads per MoE layer (rank 0 the group's rows,
  // the others zeros: the supervisor sums the ranks' reports), and when rank 0 holds a newer
  // placement from the supervisor every rank switches at the same step boundary (executor.h
  // invariant 6; actors/expert_balancer.h: agree on the version, move the expert weights).
  std::map<int64_t, actors::expert_placement_state> placements;
  elastic::group_hooks hooks;
  if (world > 1 && moe && spec.expert().rebalance().enabled()) {
    for (int64_t l = 0; l < static_cast<int64_t>(w.layers.size()); ++l)
      if (w.layers[static_cast<size_t>(l)].is_moe)
        placements[l] = actors::expert_placement_state{moe->group()->placement(l)};
    const auto E = static_cast<size_t>(w.config().n_experts);
    hooks.after_step = [&, rank, E](int64_t step) {
      const auto last = moe->last_loads();
      for (const auto& [l, st] : placements) {
        const auto it = last.find(l);
        ctx.report_expert_loads(static_cast<int>(l), step,
                                rank == 0 && it != last.end() ? it->second : std::vector<int64_t>(E, 0));
      }
    };
    hooks.want_sync = [&] {
      for (const auto& [l, st] : placements)
        if (ctx.placement_version(static_cast<int>(l)) > st.version) return true;
      return false;
    };
    hooks.sync = [&, rank] {
      for (auto& [l, st] : placements)
        if (actors::switch_expert_placement(ctx, *epc, static_cast<int>(l), st,
                                            parallel::ep::ep_expert_sets(w.layers[static_cast<size_t>(l)],
                                                                         w.config()))) {
          moe->group()->set_placement(l, st.placement);
          if (rank == 0)
            runtime::log::info("serve: layer {} moved to expert placement v{} (rank 0 has sent {} bytes of experts "
                               "in all)", l, st.version, st.bytes_sent);
        }
    };
  }
  const bool dp = world > 1 && spec.engine().attention() == "data_parallel";
  if (dp) {
    // Data-parallel attention: every rank its own engine and KV cache (the group's minimum of blocks,
    // so a request rank 0 accepts fits any rank), rank 0 dispatching; the MoE layers exchange rows.
    const int64_t agreed = elastic::agree_num_blocks(*epc, blocks);
    TROUPE_CHECK(agreed >= 1, errc::invalid_argument,
                 "rank {}: some rank's KV cache budget holds no block of {} tokens (the group's minimum is {}); "
                 "raise engine.kv_cache_memory",
                 rank, bs, agreed);
    elastic::local_executor exec(dec, agreed, bs);
    elastic::engine_options eo = engine_options_from(spec);
    eo.group_member = true;
    if (rank != 0) eo.max_waiting *= world;  // rank 0 bounds the group (dp_group.h invariant 3)
    elastic::engine eng(exec, *tok, eo);
    if (rank != 0) {
      // A signal here waits for rank 0 (troupe-launch and mpirun signal every rank); a second exits.
      const int64_t steps = elastic::dp_follow(eng, *epc, hooks).steps;
      const auto st = eng.stats();
      rep.add_lines(fmt::format("rank {}: {} lockstep iterations, {} requests served, {} tokens generated", rank,
                                steps, st.finished, st.generated_tokens));
      return;
    }
    elastic::dp_leader leader(eng, *epc, elastic::make_dp_dispatch(spec.engine().dispatch(), world, bs), hooks);
    lead(ctx, rep, spec, w, *tok,
         {eng, leader, [&] { return leader.metrics_text(); },
          [&] { return leader.broken() ? leader.broken_reason() : std::string(); }, world,
          fmt::format("data-parallel attention, dispatch {}", leader.policy().name()), nullptr, 1, {}});
    return;
  }
  if (rank != 0) {
    // A signal here waits for rank 0 (troupe-launch and mpirun signal every rank); a second exits.
    const int64_t steps = elastic::follow_group(dec, blocks, bs, *epc, hooks);
    rep.add_lines(fmt::format("rank {}: followed {} model steps", rank, steps));
    return;
  }
  std::unique_ptr<elastic::model_executor> exec;
  elastic::group_executor* gx = nullptr;
  if (epc) {
    auto g = std::make_unique<elastic::group_executor>(dec, blocks, bs, *epc, hooks);
    gx = g.get();
    exec = std::move(g);
  } else {
    exec = std::make_unique<elastic::local_executor>(dec, blocks, bs);
  }
  elastic::engine eng(*exec, *tok, engine_options_from(spec));
  lead(ctx, rep, spec, w, *tok,
       {eng, eng, nullptr, [gx] { return gx && gx->broken() ? gx->broken_reason() : std::string(); }, world,
        "attention replicated on every rank", nullptr, 1, {}});
}

int serve(const serve_options& o) {
  const rank_info r = discover_rank();
  install_stop_handlers();
  if (r.world_size > 1) runtime::log::set_rank(r.rank);
  const serve::ServeSpec spec = runtime::load_serve_spec(o.spec, o.sets);
  if (spec.engine().ranks() > 1) {
    const runtime::model_config mc = runtime::load_hf_config(spec.model() + "/config.json");
    TROUPE_CHECK(mc.is_moe() || spec.engine().attention() == "data_parallel", errc::invalid_argument,
                 "{}: engine.ranks = {} with engine.attention: replicated, but {} is a dense model: replicated "
                 "ranks split the MoE layers' experts only, so they would only repeat each other's work; use "
                 "engine.attention: data_parallel (each rank serves its own requests) or engine.ranks: 1",
                 o.spec, spec.engine().ranks(), spec.model());
    TROUPE_CHECK(!mc.is_moe() || mc.n_experts % spec.engine().ranks() == 0, errc::invalid_argument,
                 "{}: engine.ranks = {} does not divide the model's {} experts; pick a divisor of {}", o.spec,
                 spec.engine().ranks(), mc.n_experts, mc.n_experts);
  }
  TROUPE_CHECK(r.late_join || spec.engine().ranks() <= r.world_size, errc::invalid_argument,
               "{}: engine.ranks = {}, but troupe serve was launched on {} rank(s) (use troupe-launch -n {} or "
               "mpirun -np {}, or --set engine.ranks={})",
               o.spec, spec.engine().ranks(), r.world_size, spec.engine().ranks(), spec.engine().ranks(),
               r.world_size);
  serve_options opts = o;
  if (const char* m = std::getenv("TROUPE_MIN_RANKS"); m != nullptr && *m != '\0') opts.min_ranks = std::atoi(m);
  const char* max_ranks = std::getenv("TROUPE_MAX_RANKS");
  if (const char* s = std::getenv("TROUPE_OPEN_SLOTS"); s != nullptr && *s != '\0') opts.open_slots = std::atoi(s);
  opts.elastic = r.late_join || spec.engine().ranks() < r.world_size ||
                 (max_ranks != nullptr && *max_ranks != '\0' && (r.world_size > 1 || opts.open_slots > 0));
  if (opts.elastic) {  // the processes beyond engine.ranks wait as standby; a lost rank is survived
    TROUPE_CHECK(spec.engine().attention() == "data_parallel", errc::invalid_argument,
                 "{}: {} processes for engine.ranks = {}: the group can grow into the others only with "
                 "engine.attention: data_parallel",
                 o.spec, r.world_size, spec.engine().ranks());
    TROUPE_CHECK(!spec.expert().rebalance().enabled(), errc::invalid_argument,
                 "{}: expert.rebalance with a group that changes size is not supported: turn one off", o.spec);
    TROUPE_CHECK(opts.min_ranks >= 1 && spec.engine().ranks() >= opts.min_ranks, errc::invalid_argument,
                 "{}: engine.ranks = {} is below --min-ranks {}: the group starts with engine.ranks ranks", o.spec,
                 spec.engine().ranks(), opts.min_ranks);
    TROUPE_CHECK(o.backend == "auto" || o.backend == "ucx", errc::invalid_argument,
                 "--backend {}: a group that changes size runs over UCX", o.backend);
  }
  TROUPE_CHECK(!spec.engine().autoscale().enabled() || spec.engine().ranks() < r.world_size || opts.open_slots > 0 ||
                   r.late_join,
               errc::invalid_argument,
               "{}: engine.autoscale needs an elastic group: start more processes than engine.ranks "
               "(troupe-launch --min-ranks 1 --max-ranks N, or --open-slots N)",
               o.spec);
  if (o.threads > 0) runtime::set_num_threads(o.threads);
  else if (std::getenv("TROUPE_NUM_THREADS") == nullptr)
    runtime::set_num_threads(std::max(1, runtime::hardware_threads() / std::max(1, r.local_world_size)));
  cluster_setup_options so;
  so.heartbeat_timeout_ms = o.heartbeat_timeout_ms;
  so.join_timeout_ms = o.join_timeout_ms;
  so.late_join_ok = true;  // troupe-launch --join: a standby rank of a running elastic group
  group_command g;
  g.kind = Command::SERVE;
  g.what = "serving";
  g.args["spec"] = o.spec;
  g.timeout_ms = std::numeric_limits<int>::max();  // until rank 0 stops serving (~24 days at most)
  g.run = [&](const Command&, actors::worker_context& ctx, control::StatsReport& rep) {
    run_serve(ctx, rep, spec, opts, r);
  };
  return run_group_command(r, so, [&](actors::cluster_options& co) {
    co.keep_members = opts.elastic;  // the group outlives a lost rank (dp_group.h invariant 8)
    co.open_slots = opts.elastic ? opts.open_slots : 0;  // processes may join it (actors/supervisor.h invariant 8)
    co.rebalance_experts = spec.engine().ranks() > 1 && spec.expert().rebalance().enabled();
    co.experts = parallel::ep::ep_rebalance_options_from(spec.expert());
  }, g);
}

}  // namespace

void register_serve(CLI::App& app) {
  auto o = std::make_shared<serve_options>();
  auto* cmd = app.add_subcommand("serve", "serve a model over an OpenAI-compatible HTTP API (serve.yaml)");
  cmd->add_option("spec", o->spec, "the serve spec (YAML; see examples/serve_moe/serve.yaml)")->required();
  cmd->add_option("--set", o->sets, "override a key: --set server.port=0 (repeatable)");
  cmd->add_option("--threads", o->threads, "CPU threads per rank (0 = TROUPE_NUM_THREADS or the cores / local ranks)");
  cmd->add_option("--backend", o->backend, "communicator between ranks: auto (mpi under mpirun, else ucx), mpi, ucx");
  cmd->add_option("--join-timeout-ms", o->join_timeout_ms, "every rank must join within this");
  cmd->add_option("--heartbeat-timeout-ms", o->heartbeat_timeout_ms, "silence after which a rank is lost");
  cmd->callback([o] {
    const int code = serve(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace troupe::launch
