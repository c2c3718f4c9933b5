// `troupe selftest`: brings up the actor runtime on every rank (supervisor on rank 0,
// a worker everywhere), measures the control plane's round trip, runs the communicator
// conformance suite (runtime/communicator_check.h) on every backend this build and
// launch offer, and prints one summary on rank 0. With --loop it then runs a loop of
// checked all_reduces — the workload of the failure tests (kill -9 / SIGSTOP a rank).
//
//   mpirun -np 4 troupe selftest           # backends: mpi, ucx (+ nccl with GPUs)
//   troupe-launch -n 4 -- troupe selftest  # backends: ucx (+ nccl), bootstrapped by the supervisor
//
// Exit codes: 0 every check passed; 1 a check failed; 3 the group was torn down after
// a rank was lost; 4 the supervisor was lost; 5 this rank's join was refused.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <sstream>
#include <thread>

#include "actors/cluster.h"
#include "launch/cluster_setup.h"
#include "launch/commands.h"
#include "launch/process_group.h"
#include "launch/rank_env.h"
#include "runtime/communicator.h"
#include "runtime/communicator_check.h"
#include "runtime/communicator_mpi.h"
#include "runtime/communicator_nccl.h"
#include "runtime/communicator_ucx.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/log.h"

#ifdef TROUPE_FEATURE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace troupe::launch {

namespace {

namespace log = runtime::log;
using runtime::errc;
using control::Command;

struct selftest_options {
  std::string backends = "all";
  int pings = 200;
  int64_t loop = 0;              // collective-loop iterations (0 = no loop)
  std::string loop_backend = "ucx";
  int loop_sleep_ms = 0;
  int heartbeat_ms = 500;
  int heartbeat_timeout_ms = 5000;
  int join_timeout_ms = 60000;
  int max_restarts = 0;
  int command_timeout_ms = 600000;
};

std::unique_ptr<runtime::communicator> make_comm(const std::string& backend, actors::worker_context& ctx,
                                                 int local_rank, runtime::device* dev) {
  return make_group_comm(backend, ctx, local_rank, dev);
}

void run_selftest(const Command& cmd, actors::worker_context& ctx, control::StatsReport& rep, int local_rank) {
  bool all_ok = true;
  for (const auto& backend : split_list(cmd.args().at("backends"))) {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      runtime::device dev = runtime::device::cpu();
      auto comm = make_comm(backend, ctx, local_rank, &dev);
      active_guard guard(ctx, {comm.get()});  // cleared even when a check throws
      runtime::comm_check_options co;
      co.dev = dev;
      const auto results = check_communicator(*comm, co);
      const bool ok = std::all_of(results.begin(), results.end(), [](const auto& r) { return r.ok; });
      all_ok = all_ok && ok;
      // Barrier latency: the data plane's cheapest synchronisation, next to the actor round trip.
      const int iters = 200;
      comm->barrier();
      const auto b0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) comm->barrier();
      const double barrier_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - b0).count() / iters;
      (*rep.mutable_timings_s())[backend + ".barrier"] = barrier_us * 1e-6;
#ifdef TROUPE_FEATURE_MPI
      if (backend == "mpi") {  // the baseline: a bare MPI_Barrier, same ranks, same run
        MPI_Barrier(MPI_COMM_WORLD);
        const auto m0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) MPI_Barrier(MPI_COMM_WORLD);
        (*rep.mutable_timings_s())["mpi.raw_barrier"] =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - m0).count() / iters;
      }
#endif
      rep.add_lines(fmt::format("{}: {}; barrier {:.1f} us", backend, runtime::summarize(results, *comm), barrier_us));
    } catch (const runtime::error& e) {
      if (e.code() == errc::unsupported) {
        rep.add_lines(fmt::format("{}: skipped: {}", backend, e.what()));
      } else {
        all_ok = false;
        rep.add_lines(fmt::format("{}: FAILED: {}", backend, e.what()));
        if (e.code() == errc::aborted) throw;  // the group is over
      }
    }
    (*rep.mutable_timings_s())[backend] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  TROUPE_CHECK(all_ok, errc::internal, "rank {}: some communicator checks failed", ctx.rank());
}

// all_reduce sum of i64 values every member can predict: checks each result exactly.
void run_loop(const Command& cmd, actors::worker_context& ctx, control::StatsReport& rep, int local_rank) {
  const int64_t iterations = std::stoll(cmd.args().at("iterations"));
  const int sleep_ms = std::stoi(cmd.args().at("sleep_ms"));
  auto comm = make_comm(cmd.args().at("backend"), ctx, local_rank, nullptr);
  active_guard guard(ctx, {comm.get()});  // cleared even when a check throws
  log::info("collective loop running: pid {}, group rank {} of {}, epoch {}, backend {}", ::getpid(),
            ctx.group_rank(), ctx.group_size(), ctx.epoch(), comm->backend());
  const int64_t n = 4096;
  runtime::tensor t = runtime::tensor::empty({n}, runtime::dtype::i64);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = (ctx.rank() + 1) * 1000003 + it * 31 + i;
    comm->all_reduce(t, runtime::reduce_op::sum);
    int64_t rank_sum = 0;
    for (int r : ctx.members()) rank_sum += r + 1;
    const int64_t P = ctx.group_size();
    for (int64_t i = 0; i < n; i += 511)
      TROUPE_CHECK(t.data<int64_t>()[i] == rank_sum * 1000003 + P * (it * 31 + i), errc::internal,
                   "collective loop: iteration {} element {} is {}", it, i, t.data<int64_t>()[i]);
    if (sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  (*rep.mutable_timings_s())["loop"] = s;
  rep.add_lines(fmt::format("collective loop: {} all_reduces of {} i64 checked in epoch {} with {} ranks ({:.1f} us "
                            "each)",
                            iterations, n, ctx.epoch(), ctx.group_size(), s / std::max<int64_t>(1, iterations) * 1e6));
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * static_cast<double>(v.size() - 1))];
}

// Rank 0's job: everything the supervisor asks and prints. Returns the exit code.
int drive(actors::supervisor_client& sup, const selftest_options& o, const rank_info& r, int port,
          const std::vector<std::string>& backends) {
  const auto group = sup.wait_for_group(o.join_timeout_ms);
  fmt::print("troupe selftest: {} rank(s) from {}, supervisor on port {}\n", r.world_size, r.source, port);
  for (const auto& m : sup.members())
    fmt::print("  rank {}: pid {} on {}, {}, backends {}\n", m.rank(), m.pid(), m.host(), m.device(),
               fmt::join(m.backends(), ","));
  int64_t id = 0;
  // The control plane: supervisor -> every worker -> supervisor.
  std::vector<double> us;
  for (int i = 0; i < o.pings; ++i) {
    Command ping;
    ping.set_id(++id);
    ping.set_kind(Command::PING);
    const auto t0 = std::chrono::steady_clock::now();
    sup.run(ping, 30000);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!us.empty())
    fmt::print("control plane: command round trip to all {} workers: mean {:.1f} us, p50 {:.1f} us, p99 {:.1f} us "
               "({} rounds)\n",
               group.members_size(), std::accumulate(us.begin(), us.end(), 0.0) / static_cast<double>(us.size()),
               percentile(us, 0.5), percentile(us, 0.99), us.size());
  const double round_trip_us =
      us.empty() ? 0 : std::accumulate(us.begin(), us.end(), 0.0) / static_cast<double>(us.size());
  bool ok = true;
  if (!backends.empty()) {
    Command st;
    st.set_id(++id);
    st.set_kind(Command::RUN_SELFTEST);
    (*st.mutable_args())["backends"] = fmt::format("{}", fmt::join(backends, ","));
    double raw_barrier_s = 0;
    for (const auto& rep : sup.run(st, o.command_timeout_ms)) {
      ok = ok && rep.ok();
      for (const auto& line : rep.lines()) fmt::print("rank {}: {}\n", rep.rank(), line);
      if (!rep.ok()) fmt::print("rank {}: FAILED: {}\n", rep.rank(), rep.error());
      if (auto it = rep.timings_s().find("mpi.raw_barrier"); it != rep.timings_s().end())
        raw_barrier_s = std::max(raw_barrier_s, it->second);
    }
    if (raw_barrier_s > 0 && round_trip_us > 0)
      fmt::print("control plane vs MPI: command round trip {:.1f} us = {:.1f} x a bare MPI_Barrier ({:.1f} us, "
                 "slowest rank)\n",
                 round_trip_us, round_trip_us / (raw_barrier_s * 1e6), raw_barrier_s * 1e6);
  }
  if (o.loop > 0) {
    Command loop;
    loop.set_id(++id);
    loop.set_kind(Command::COLLECTIVE_LOOP);
    (*loop.mutable_args())["backend"] = o.loop_backend;
    (*loop.mutable_args())["iterations"] = std::to_string(o.loop);
    (*loop.mutable_args())["sleep_ms"] = std::to_string(o.loop_sleep_ms);
    for (const auto& rep : sup.run(loop, o.command_timeout_ms)) {
      ok = ok && rep.ok();
      for (const auto& line : rep.lines()) fmt::print("rank {}: {}\n", rep.rank(), line);
      if (!rep.ok()) fmt::print("rank {}: FAILED: {}\n", rep.rank(), rep.error());
    }
  }
  fmt::print("selftest: {}\n", ok ? "PASS" : "FAIL");
  std::fflush(stdout);
  sup.shutdown(ok ? "selftest done" : "selftest failed", ok ? 0 : 1);
  return ok ? 0 : 1;
}

int selftest(const selftest_options& o) {
  const rank_info r = discover_rank();
  if (r.world_size > 1) log::set_rank(r.rank);
  start_mpi_if_launched(r);
  cluster_setup_options so;
  so.heartbeat_ms = o.heartbeat_ms;
  so.heartbeat_timeout_ms = o.heartbeat_timeout_ms;
  so.join_timeout_ms = o.join_timeout_ms;
  so.max_restarts = o.max_restarts;
  so.backends = available_backends(o.backends);
  const std::vector<std::string> backends = so.backends;
  const actors::cluster_options co = cluster_options_for(r, so);

  actors::cluster_node node(co);
  node.local_worker().on(Command::RUN_SELFTEST, [lr = r.local_rank](const Command& c, actors::worker_context& ctx,
                                                                     control::StatsReport& rep) {
    run_selftest(c, ctx, rep, lr);
  });
  node.local_worker().on(Command::COLLECTIVE_LOOP, [lr = r.local_rank](const Command& c, actors::worker_context& ctx,
                                                                        control::StatsReport& rep) {
    run_loop(c, ctx, rep, lr);
  });
  return run_cluster_node(node, "selftest", [&](actors::supervisor_client& sup) {
    return drive(sup, o, r, node.supervisor_port(), backends);
  });
}

}  // namespace

void register_selftest(CLI::App& app) {
  auto o = std::make_shared<selftest_options>();
  auto* cmd = app.add_subcommand("selftest", "check the actor runtime and every communicator backend on all ranks");
  cmd->add_option("--backends", o->backends, "comma list of mpi,ucx,nccl; 'all' (those this launch offers) or 'none'");
  cmd->add_option("--pings", o->pings, "control-plane round trips to time");
  cmd->add_option("--loop", o->loop, "then run this many checked all_reduces (the failure tests' workload)");
  cmd->add_option("--loop-backend", o->loop_backend, "backend of the loop (ucx; mpi only under mpirun)");
  cmd->add_option("--loop-sleep-ms", o->loop_sleep_ms, "pause between loop iterations");
  cmd->add_option("--heartbeat-ms", o->heartbeat_ms, "worker heartbeat interval");
  cmd->add_option("--heartbeat-timeout-ms", o->heartbeat_timeout_ms, "silence after which a rank is lost");
  cmd->add_option("--join-timeout-ms", o->join_timeout_ms, "every rank must join within this");
  cmd->add_option("--max-restarts", o->max_restarts, "group rebuilds (with the survivors) after losing a rank");
  cmd->callback([o] {
    const int code = selftest(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace troupe::launch
