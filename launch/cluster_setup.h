// launch/cluster_setup.h — what every multi-rank subcommand (selftest, train) does first:
// find its rank, start MPI when mpirun launched it, agree on the supervisor's address and
// the cluster token, and later build communicators among a command's group.
//
//   rank_info r = discover_rank();
//   actors::cluster_options co = cluster_options_for(r, {.heartbeat_ms = 500});
//   actors::cluster_node node(co);   // supervisor on rank 0, a worker everywhere
//   ... inside a command:  auto comm = make_group_comm("ucx", ctx, r.local_rank);
//
// Invariants:
//   1. Under mpirun (Open MPI / PMIx / PMI environment) an MPI session is started once per
//      process (mpi_session_of_process()); without TROUPE_SUPERVISOR, rank 0 picks a free
//      port and a random token and shares them over MPI (a trusted channel).
//   2. With TROUPE_SUPERVISOR (troupe-launch) every rank needs TROUPE_CLUSTER_TOKEN; a
//      missing token is errc::invalid_argument. A multi-rank job with neither is refused.
//   3. make_group_comm: "mpi" (only under mpirun, only the first epoch: MPI_COMM_WORLD
//      cannot shrink), "ucx" (addresses exchanged through the supervisor), "nccl" (GPUs).
//      An unavailable backend is errc::unsupported naming why.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/cluster.h"
#include "launch/rank_env.h"
#include "runtime/communicator.h"
#include "runtime/communicator_mpi.h"
#include "runtime/device.h"

namespace troupe::launch {

struct cluster_setup_options {
  int heartbeat_ms = 500;
  int heartbeat_timeout_ms = 5000;
  int join_timeout_ms = 60000;
  int max_restarts = 0;
  bool late_join_ok = false;  // the command can join a running group (rank_env.h invariant 4): serve
  std::vector<std::string> backends;  // offered by this process (see available_backends)
};

// The process's MPI session, or null when not launched by mpirun.
std::unique_ptr<runtime::mpi_session>& mpi_session_of_process();
// Starts MPI when the rank came from mpirun's environment (idempotent).
void start_mpi_if_launched(const rank_info& r);

// Registers a command's communicators with its worker for as long as it lives, so they are aborted
// when the group ends (worker.h invariant 2).
struct active_guard {
  actors::worker_context& ctx;
  active_guard(actors::worker_context& c, std::vector<runtime::communicator*> comms) : ctx(c) {
    ctx.set_active(std::move(comms));
  }
  ~active_guard() { ctx.set_active(nullptr); }
  active_guard(const active_guard&) = delete;
  active_guard& operator=(const active_guard&) = delete;
};

// Backends built in and usable in this launch: mpi (under mpirun), ucx, nccl (with a GPU).
// `request` is "all", "none" or a comma list.
std::vector<std::string> available_backends(const std::string& request = "all");

actors::cluster_options cluster_options_for(const rank_info& r, const cluster_setup_options& o);

// A communicator among the command's group (`members` of ctx, in group order).
// `dev` (nullable) receives the device the backend runs on.
std::unique_ptr<runtime::communicator> make_group_comm(const std::string& backend, actors::worker_context& ctx,
                                                       int local_rank, runtime::device* dev = nullptr,
                                                       int timeout_ms = 30000);
// A communicator among `members` (group ranks of ctx's group, in order): every rank of the
// group calls it at once with ITS sub-group (e.g. the context-parallel groups). MPI splits
// MPI_COMM_WORLD by `color`; UCX filters a supervisor exchange. sleep_when_idle: UCX waits sleep
// after 2 ms without progress (ucx_options; for ranks that may wait long, an idle serving group).
std::unique_ptr<runtime::communicator> make_subgroup_comm(const std::string& backend, actors::worker_context& ctx,
                                                          const std::vector<int>& members, int color,
                                                          const std::string& name, int timeout_ms = 30000,
                                                          bool sleep_when_idle = false);

// Starts the node (joins), runs `drive` on rank 0 (the supervisor's job driver), waits
// for this rank's worker to be told to stop, and returns the process exit code: the
// worker's, or the driver's when worse (a driver failing with errc::aborted — the group
// was torn down — is exit_group_torn_down; other driver errors 1; a refused join 5).
// `what` prefixes the driver's error in the log ("train", "selftest").
int run_cluster_node(actors::cluster_node& node, const char* what,
                     const std::function<int(actors::supervisor_client&)>& drive);

// One command for the whole group, run until every rank reports: how `troupe train` and `troupe
// serve` run. Starts MPI when mpirun launched this process, builds the node from `so` (then
// `tweak`, e.g. the supervisor's expert balancer), registers `run` for `kind` on this rank's
// worker, and on rank 0 drives it: waits for every rank, issues the command with `args`, prints
// each failed rank's error, calls `after` with the reports, shuts the group down ("<what> done" or
// "<what> failed"). Returns the exit code as run_cluster_node.
struct group_command {
  control::Command::Kind kind = control::Command::PING;
  const char* what = "";                          // "training", "serving"
  std::map<std::string, std::string> args;
  int timeout_ms = 0;                             // how long rank 0 waits for the reports
  actors::command_handler run;
  std::function<void(actors::supervisor_client&, const std::vector<control::StatsReport>&)> after;  // optional
};
int run_group_command(const rank_info& r, cluster_setup_options so,
                      const std::function<void(actors::cluster_options&)>& tweak, const group_command& g);

std::vector<std::string> split_list(const std::string& s);
std::string this_hostname();

}  // namespace troupe::launch
