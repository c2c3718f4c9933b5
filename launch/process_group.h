// launch/process_group.h — start N ranks of one command on this host, as torchrun
// does: environment per rank, rank-prefixed output, signal forwarding, and fail-fast
// teardown when one rank fails. The engine of `troupe-launch`.
//
//   launch_options o;  o.nprocs = 4;  o.command = {"troupe", "selftest"};
//   launch_result r = run_local(o);       // blocks until every rank has exited
//   if (!r.ok()) fmt::print("{}\n", r.summary);   // "rank 2 failed: killed by signal 9 (SIGKILL)"
//
// Invariants:
//   1. Rank i gets TROUPE_RANK=i, TROUPE_WORLD_SIZE=N, TROUPE_LOCAL_RANK=i,
//      TROUPE_LOCAL_WORLD_SIZE=N, TROUPE_SUPERVISOR=127.0.0.1:<port> (a free port unless
//      given) and TROUPE_CLUSTER_TOKEN (random unless given), on top of the caller's env; with
//      max_ranks, TROUPE_MIN_RANKS and TROUPE_MAX_RANKS too.
//   2. Every line a rank writes to stdout/stderr is forwarded to the same stream as
//      "[rank i] line" (whole lines, never interleaved mid-line).
//   3. Each rank runs in its own process group. The first rank that exits non-zero or
//      by a signal makes the group fail: the others get settle_ms to stop on their own
//      (troupe ranks do: the supervisor tears the group down and each exits with a
//      message), then SIGTERM, then SIGKILL after grace_ms. Every later non-zero exit
//      is reported too. SIGINT/SIGTERM/SIGHUP sent to the launcher are forwarded to
//      all ranks at once.
//   4. Nothing outlives run_local(): every child is reaped before it returns.
//   5. Elastic (max_ranks > 0): a rank other than 0 that fails is lost, not fatal: it is reported
//      and recorded (lost), and the others go on (the serving group survives it); rank 0 failing
//      tears the group down as invariant 3 says. open_slots (elastic) lets that many more processes
//      join the group from outside (TROUPE_OPEN_SLOTS); the launcher prints the address and how.
//   6. join (host:port of a running group's rank 0): the nprocs processes get TROUPE_JOIN=1,
//      TROUPE_SUPERVISOR and the cluster token instead of ranks (the supervisor gives them theirs);
//      each is on its own, so one that fails is reported as lost and the others go on; when every
//      one of them failed, the launch failed (the first one's exit code). The running group's
//      TROUPE_MIN_RANKS / MAX_RANKS / OPEN_SLOTS are not passed on; a launch that is not a join
//      clears an inherited TROUPE_JOIN.
//   7. The cluster token is cluster_token, else TROUPE_CLUSTER_TOKEN from the environment, else
//      random (not with join: a joiner must know the group's token).
#pragma once
#include <string>
#include <vector>

namespace troupe::launch {

struct launch_options {
  int nprocs = 1;
  std::vector<std::string> command;   // argv of every rank
  std::string supervisor;             // host:port; empty = 127.0.0.1 and a free port
  std::string cluster_token;          // empty = random
  int settle_ms = 5000;               // first failure -> SIGTERM to the others
  int grace_ms = 5000;                // SIGTERM -> SIGKILL delay at teardown
  bool prefix_output = true;
  // Elastic serving: nprocs = max_ranks processes, of which the command serves with at least
  // min_ranks (TROUPE_MIN_RANKS / TROUPE_MAX_RANKS in every rank's environment; 0 = not elastic).
  int min_ranks = 0;
  int max_ranks = 0;
  int open_slots = 0;       // invariant 5
  std::string join;         // invariant 6: host:port of the running group's supervisor
};

struct rank_exit {
  int rank = 0;
  bool exited = false;  // normal exit (then code) or killed by a signal (then signal)
  int code = 0;
  int signal = 0;
  std::string reason() const;  // "exit code 7", "killed by signal 9 (SIGKILL)"
};

struct launch_result {
  std::vector<rank_exit> ranks;  // in rank order
  int first_failed = -1;         // the rank that failed first, -1 if none
  bool interrupted = false;      // the launcher itself got SIGINT/SIGTERM/SIGHUP
  std::vector<int> lost;         // elastic: ranks that failed while the group went on (invariant 5)
  std::string summary;
  bool ok() const { return first_failed < 0 && !interrupted; }
  int exit_code() const;         // 0, the failing rank's code, or 128 + its signal
};

launch_result run_local(const launch_options& opts);

// The argv that runs the same job across hosts with mpirun (ranks then come from
// OMPI_COMM_WORLD_*; the supervisor is rank 0's host).
std::vector<std::string> mpirun_command(const launch_options& opts, const std::vector<std::string>& hosts);

// A free TCP port on 127.0.0.1 (bound and released; the caller races to use it).
int pick_free_port();
std::string random_token();

}  // namespace troupe::launch
