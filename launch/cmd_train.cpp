// `troupe train job.yaml`: the training job on one rank or many. Every rank runs a worker
// actor whose compute thread runs the trainer (parallel/train/); rank 0 also runs the
// supervisor, which hands out the TRAIN command, receives every rank's Progress and tears
// the group down when a rank dies.
//
//   troupe train examples/finetune_long_context/job.yaml
//   troupe train job.yaml --set optimizer.lr=1e-3 --set train.max_steps=50
//   troupe train job.yaml --resume                       # from checkpoint.dir's latest
//   mpirun -np 2 troupe train job.yaml                   # dp * cp must equal the ranks
//   troupe-launch -n 2 -- troupe train job.yaml
//
// Exit codes: 0 done; 1 the job failed (the error is printed); 3 the group was torn down
// after a rank was lost; 4 the supervisor was lost; 5 this rank's join was refused.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <memory>

#include "actors/cluster.h"
#include "actors/expert_balancer.h"
#include "kernels/matmul.h"
#include "launch/cluster_setup.h"
#include "launch/commands.h"
#include "parallel/train/checkpoint.h"
#include "parallel/train/train_loop.h"
#include "parallel/train/trainer.h"
#include "runtime/error.h"
#include "runtime/job_spec.h"
#include "runtime/log.h"
#include "runtime/threads.h"

namespace troupe::launch {

namespace {

namespace log = runtime::log;
using control::Command;
using runtime::errc;

struct train_options {
  std::string job;
  std::vector<std::string> sets;
  bool resume = false;
  std::string resume_from;
  std::string backend = "auto";
  bool no_progress = false;
  int heartbeat_ms = 500;
  int heartbeat_timeout_ms = 10000;
  int join_timeout_ms = 60000;
};

// One rank's whole job, on the worker's compute thread.
void run_train(const Command& cmd, actors::worker_context& ctx, control::StatsReport& rep, const job::JobSpec& spec,
               const train_options& o, const rank_info& r) {
  const int rank = ctx.group_rank(), world = ctx.group_size();
  const int cp = static_cast<int>(spec.parallel().cp());
  std::string backend = o.backend;
  if (backend == "auto") backend = mpi_session_of_process() ? "mpi" : "ucx";
  std::unique_ptr<runtime::communicator> grads, cpc, epc, epw;
  if (world > 1) {
    grads = make_group_comm(backend, ctx, r.local_rank, nullptr, 300000);
    if (spec.parallel().ep() > 1) {  // the MoE layers' tokens, and their borrowed weights beside them
      std::vector<int> all(static_cast<size_t>(world));
      for (int i = 0; i < world; ++i) all[static_cast<size_t>(i)] = i;
      epc = make_subgroup_comm(backend, ctx, all, 0, "ep", 300000);
      epw = make_subgroup_comm(backend, ctx, all, 0, "ep_weights", 300000);
    }
    if (cp > 1) {
      const int dp_rank = rank / cp;
      std::vector<int> members;
      for (int i = 0; i < cp; ++i) members.push_back(dp_rank * cp + i);
      cpc = make_subgroup_comm(backend, ctx, members, dp_rank, "cp", 300000);
    }
  }
  active_guard guard(ctx, {grads.get(), cpc.get(), epc.get(), epw.get()});
  parallel::train_comms comms;
  comms.rank = rank;
  comms.world_size = world;
  comms.grads = grads.get();
  comms.cp = cpc.get();
  comms.ep = epc.get();
  comms.ep_weights = epw.get();

  std::string resume = o.resume_from;
  if (o.resume && resume.empty()) {
    resume = parallel::latest_checkpoint(spec.checkpoint().dir());
    TROUPE_CHECK(!resume.empty(), errc::not_found, "--resume: no complete checkpoint in {} (checkpoint.dir)",
                 spec.checkpoint().dir());
  }
  auto t = parallel::make_trainer(spec, comms, resume);
  if (rank == 0) {
    fmt::print("troupe train: {} parameters, {} rank(s) (dp {} x cp {}{}, {}), {} threads each{}\n",
               total_parameters(t->weights().config()), world, spec.parallel().dp(), cp,
               spec.parallel().ep() > 1 ? fmt::format(", ep {} {}", spec.parallel().ep(),
                                                      parallel::ep::ep_mode_name(t->expert_parallel()->options().mode))
                                        : std::string(),
               world > 1 ? backend : "no communicator",
               runtime::num_threads(), resume.empty() ? "" : fmt::format(", resumed from {} at step {}", resume,
                                                                         t->steps_done()));
    std::fflush(stdout);
  }
  parallel::train_loop_options lo;
  // mpirun hands its ranks a pseudo-terminal even when its own output is a file: no live line there.
  lo.tty = !o.no_progress && ::isatty(STDOUT_FILENO) != 0 && !mpi_session_of_process();
  lo.peak_gflops = kernels::cpu::sgemm_peak_gflops(2048, 3);  // as bench/train_bench measures it
  lo.on_step = [&](const nlohmann::json& rec) {
    control::Progress p;
    p.set_command_id(cmd.id());
    p.set_step(rec["step"].get<int64_t>());
    p.set_max_steps(spec.train().max_steps());
    p.set_loss(rec["loss"].get<double>());
    p.set_tokens_per_s(rec["tokens_per_s"].get<double>());
    p.set_step_s(rec["step_ms"].get<double>() * 1e-3);
    p.mutable_memory()->set_host_bytes_in_use(rec["mem"]["host"].get<int64_t>());
    (*p.mutable_values())["lr"] = rec["lr"].get<double>();
    (*p.mutable_values())["grad_norm"] = rec["grad_norm"].get<double>();
    (*p.mutable_values())["mfu"] = rec["mfu"].get<double>();
    (*p.mutable_values())["host_peak_bytes"] = static_cast<double>(rec["mem_peak"]["host"].get<int64_t>());
    ctx.report_progress(std::move(p));
  };
  // parallel.expert.rebalance: report each MoE layer's loads to the supervisor after every step and
  // switch to the placement it sends once every rank holds it (actors/expert_balancer.h).
  std::map<int64_t, actors::expert_placement_state> placements;
  if (t->expert_parallel() && spec.parallel().expert().rebalance().enabled())
    for (int64_t l = 0; l < static_cast<int64_t>(t->weights().layers.size()); ++l)
      if (t->weights().layers[static_cast<size_t>(l)].is_moe)
        placements[l] = actors::expert_placement_state{t->expert_parallel()->placement(l)};
  if (!placements.empty()) {
    auto progress = lo.on_step;
    lo.on_step = [&, progress](const nlohmann::json& rec) {
      progress(rec);
      const int64_t step = rec["step"].get<int64_t>();
      for (auto& [l, st] : placements) {
        ctx.report_expert_loads(static_cast<int>(l), step, t->expert_parallel()->layer_stats(l).loads);
        if (actors::switch_expert_placement(ctx, *epc, static_cast<int>(l), st, t->expert_sets(l))) {
          t->set_expert_placement(l, st.placement);
          if (rank == 0)
            runtime::log::info("step {}: layer {} moved to expert placement v{} (rank 0 has sent {} bytes of experts "
                               "in all)", step, l, st.version, st.bytes_sent);
        }
      }
    };
  }
  lo.stop_requested = [&] { return ctx.group_over(); };
  const nlohmann::json summary = parallel::run_training(*t, lo);
  TROUPE_CHECK(!summary.value("stopped", false), errc::aborted, "rank {}: training stopped at step {}: the group ended",
               rank, t->steps_done());
  (*rep.mutable_timings_s())["train"] = summary["train_s"].get<double>();
  rep.add_lines(fmt::format("{} steps, final loss {:.4f}, {:.0f} tok/s", summary["steps"].get<int64_t>(),
                            summary["final_loss"].get<double>(), summary["tokens_per_s"].get<double>()));
}

int train(const train_options& o) {
  const rank_info r = discover_rank();
  if (r.world_size > 1) log::set_rank(r.rank);
  const job::JobSpec spec = runtime::load_job_spec(o.job, o.sets);
  TROUPE_CHECK(r.world_size == runtime::job_world_size(spec), errc::invalid_argument,
               "{}: parallel.dp {} x parallel.cp {} = {} ranks, but this job was launched with {} (use mpirun -np {} "
               "or troupe-launch -n {})",
               o.job, spec.parallel().dp(), spec.parallel().cp(), runtime::job_world_size(spec), r.world_size,
               runtime::job_world_size(spec), runtime::job_world_size(spec));
  if (std::getenv("TROUPE_NUM_THREADS") == nullptr)
    runtime::set_num_threads(std::max(1, runtime::hardware_threads() / std::max(1, r.local_world_size)));
  if (r.rank == 0) {
    fmt::print("troupe train {} — effective job spec (defaults filled in):\n{}\n", o.job, runtime::describe(spec));
    std::fflush(stdout);
  }
  cluster_setup_options so;
  so.heartbeat_ms = o.heartbeat_ms;
  so.heartbeat_timeout_ms = o.heartbeat_timeout_ms;
  so.join_timeout_ms = o.join_timeout_ms;
  group_command g;
  g.kind = Command::TRAIN;
  g.what = "training";
  g.args["job"] = o.job;
  g.timeout_ms = 7 * 24 * 3600 * 1000;
  g.run = [&](const Command& c, actors::worker_context& ctx, control::StatsReport& rep) {
    run_train(c, ctx, rep, spec, o, r);
  };
  g.after = [](actors::supervisor_client& sup, const std::vector<control::StatsReport>& reports) {
    if (reports.size() <= 1) return;
    fmt::print("per rank (as the supervisor saw it):\n");
    for (const auto& p : sup.progress())
      fmt::print("  rank {}: step {}/{}, loss {:.4f}, {:.0f} tok/s, host peak {:.1f} MiB\n", p.rank(), p.step(),
                 p.max_steps(), p.loss(), p.tokens_per_s(), p.values().count("host_peak_bytes") ?
                 p.values().at("host_peak_bytes") / (1 << 20) : 0.0);
  };
  return run_group_command(r, so, [&](actors::cluster_options& co) {
    co.rebalance_experts = spec.parallel().ep() > 1 && spec.parallel().expert().rebalance().enabled();
    co.experts = parallel::ep::ep_rebalance_options_from_spec(spec);
  }, g);
}

}  // namespace

void register_train(CLI::App& app) {
  auto o = std::make_shared<train_options>();
  auto* cmd = app.add_subcommand("train", "train (fine-tune) a model as a job.yaml says, on one rank or many");
  cmd->add_option("job", o->job, "the job spec (YAML; see examples/finetune_long_context/job.yaml)")->required();
  cmd->add_option("--set", o->sets, "override a key: --set optimizer.lr=1e-3 (repeatable)");
  cmd->add_flag("--resume", o->resume, "continue from the newest checkpoint in checkpoint.dir");
  cmd->add_option("--resume-from", o->resume_from, "continue from this checkpoint directory");
  cmd->add_option("--backend", o->backend, "communicator between ranks: auto (mpi under mpirun, else ucx), mpi, ucx");
  cmd->add_flag("--no-progress", o->no_progress, "no live progress line even on a terminal");
  cmd->add_option("--heartbeat-timeout-ms", o->heartbeat_timeout_ms, "silence after which a rank is lost");
  cmd->add_option("--join-timeout-ms", o->join_timeout_ms, "every rank must join within this");
  cmd->callback([o] {
    const int code = train(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace troupe::launch
