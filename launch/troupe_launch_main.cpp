// launch/troupe_launch_main.cpp — `troupe-launch`, troupe's torchrun.
//
//   troupe-launch -n 4 -- troupe info
//   troupe-launch -n 8 --hosts a,b -- troupe train job.yaml     # wraps mpirun
//   troupe-launch --min-ranks 1 --max-ranks 4 -- troupe serve serve.yaml   # 4 processes: the serving
//                                                # group and standby ranks it grows into (troupe scale)
//   troupe-launch --min-ranks 1 --max-ranks 2 --open-slots 4 --supervisor HOST:7000 -- troupe serve serve.yaml
//   TROUPE_CLUSTER_TOKEN=... troupe-launch --join HOST:7000 -n 2 -- troupe serve serve.yaml  # from elsewhere
//
// Exits 0 when every rank exits 0; otherwise with the first failing rank's exit code
// (128 + signal when it was killed), after printing which rank failed and why.
#include <unistd.h>

#include <CLI/CLI.hpp>

#include "launch/process_group.h"
#include "runtime/error.h"
#include "runtime/log.h"

int main(int argc, char** argv) {
  using namespace troupe::launch;
  CLI::App app{"troupe-launch — start N ranks of a command with the troupe environment"};
  launch_options o;
  std::string hosts;
  bool dry_run = false;
  auto* n_opt = app.add_option("-n,--nprocs", o.nprocs, "number of ranks")->check(CLI::Range(1, 4096));
  auto* max_opt = app.add_option("--max-ranks", o.max_ranks,
                                 "elastic serving: start this many processes; the group grows into the ones it does "
                                 "not use (troupe scale)")
                      ->check(CLI::Range(1, 4096));
  app.add_option("--min-ranks", o.min_ranks, "elastic serving: the group never shrinks below this (default 1)")
      ->check(CLI::Range(1, 4096))
      ->needs(max_opt);
  n_opt->excludes(max_opt);
  app.add_option("--open-slots", o.open_slots,
                 "elastic serving: this many more processes may join the group from outside (troupe-launch --join)")
      ->check(CLI::Range(1, 4096))
      ->needs(max_opt);
  auto* join_opt = app.add_option("--join", o.join,
                                  "host:port of a running elastic group's supervisor: the -n processes join it as "
                                  "standby ranks (TROUPE_CLUSTER_TOKEN must hold its token)");
  join_opt->excludes(max_opt);
  app.add_option("--hosts", hosts, "comma-separated hosts: run through mpirun -H instead of local processes");
  app.add_option("--supervisor", o.supervisor, "host:port of the supervisor (default 127.0.0.1:<free port>)");
  app.add_option("--settle-ms", o.settle_ms,
                 "after a rank fails, how long the others get to stop on their own before SIGTERM")
      ->check(CLI::Range(0, 3600000));
  app.add_option("--grace-ms", o.grace_ms, "delay between SIGTERM and SIGKILL when tearing down")
      ->check(CLI::Range(0, 600000));
  app.add_flag("--dry-run", dry_run, "print the mpirun command (with --hosts) and exit");
  app.add_option("command", o.command, "the command every rank runs (after --)")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (o.max_ranks > 0) {
    if (o.min_ranks == 0) o.min_ranks = 1;
    if (o.min_ranks > o.max_ranks) {
      troupe::runtime::log::error("troupe-launch: --min-ranks {} exceeds --max-ranks {}", o.min_ranks, o.max_ranks);
      return 2;
    }
    o.nprocs = o.max_ranks;
  } else if (n_opt->count() == 0) {
    troupe::runtime::log::error("troupe-launch: give -n N, or --max-ranks M for an elastic serving group");
    return 2;
  }
  if (!hosts.empty() && (!o.join.empty() || o.open_slots > 0)) {
    troupe::runtime::log::error("troupe-launch: --join and --open-slots start local processes; run troupe-launch "
                                "--join on each host instead of --hosts");
    return 2;
  }
  try {
    if (!hosts.empty()) {
      std::vector<std::string> hs;
      for (size_t p = 0; p <= hosts.size();) {
        size_t q = hosts.find(',', p);
        if (q == std::string::npos) q = hosts.size();
        if (q > p) hs.push_back(hosts.substr(p, q - p));
        p = q + 1;
      }
      std::vector<std::string> cmd = mpirun_command(o, hs);
      if (dry_run) {
        for (size_t i = 0; i < cmd.size(); ++i) fmt::print("{}{}", i ? " " : "", cmd[i]);
        fmt::print("\n");
        return 0;
      }
      std::vector<char*> av;
      for (auto& a : cmd) av.push_back(a.data());
      av.push_back(nullptr);
      ::execvp(av[0], av.data());
      TROUPE_THROW(troupe::runtime::errc::io, "troupe-launch: cannot run mpirun: {}", std::strerror(errno));
    }
    launch_result r = run_local(o);
    if (!r.ok()) troupe::runtime::log::error("troupe-launch: {}", r.summary);
    else if (!r.lost.empty()) troupe::runtime::log::warn("troupe-launch: {}", r.summary);
    return r.exit_code();
  } catch (const std::exception& e) {
    troupe::runtime::log::error("{}", e.what());
    return 1;
  }
}
