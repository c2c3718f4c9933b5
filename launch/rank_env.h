// launch/rank_env.h — who am I in the job: rank, world size, local rank and the
// supervisor's address, read from the launcher's environment.
//
//   rank_info r = discover_rank();              // from the process environment
//   if (r.rank == 0) start_supervisor(r.supervisor);
//   rank_info t = discover_rank(env_map{{"TROUPE_RANK", "1"}, {"TROUPE_WORLD_SIZE", "4"}});
//
// Invariants:
//   1. Sources, first match wins: troupe's own launcher (TROUPE_RANK, TROUPE_WORLD_SIZE,
//      TROUPE_LOCAL_RANK, TROUPE_LOCAL_WORLD_SIZE, TROUPE_SUPERVISOR), Open MPI
//      (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE), PMIx (PMIX_RANK + PMIX_SIZE
//      or troupe's world size), PMI (PMI_RANK/PMI_SIZE). None set: a single rank.
//   2. A malformed or inconsistent value (not an integer, rank >= world size, a rank
//      without a world size, a supervisor that is not host:port) throws
//      errc::invalid_argument naming the variable and its value.
//   3. TROUPE_SUPERVISOR (host:port) applies whatever the rank source is.
//   4. TROUPE_JOIN=1 (troupe-launch --join): the process joins a group that already serves; it has
//      no rank yet (rank -1, world size 0, late_join) — the supervisor gives it one. It needs
//      TROUPE_SUPERVISOR and must not have TROUPE_RANK.
#pragma once
#include <cstdint>
#include <map>
#include <string>

namespace troupe::launch {

using env_map = std::map<std::string, std::string>;

struct rank_info {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string source = "default";      // "troupe", "openmpi", "pmix", "pmi", "join", "default"
  bool late_join = false;              // invariant 4
  std::string supervisor_host;         // empty when not given
  int supervisor_port = 0;
  bool has_supervisor() const { return !supervisor_host.empty(); }
};

rank_info discover_rank(const env_map& env);
rank_info discover_rank();  // reads the process environment

}  // namespace troupe::launch
