// actors/supervisor.h — the supervisor actor (rank 0): membership, monitoring,
// heartbeats, gang teardown and rebuild, and the commands of a job.
//
//   caf::actor sup = spawn_supervisor(system, opts);         // then publish it
//   supervisor_client driver(system, sup);                   // from a plain thread
//   control::Scale group = driver.wait_for_group(60000);      // every rank joined
//   auto reports = driver.run(cmd, 120000);                   // one per member
//   driver.shutdown("done", 0);
//
// Invariants:
//   1. A Join is accepted only with the cluster token, a rank in [0, world_size) and a
//      rank not already taken; anything else gets JoinReply{accepted=false, reason} and
//      is logged. Messages from actors that are not members are dropped.
//   2. Every member is monitored. A member is lost when its down_msg arrives (process
//      killed: the middleman reports the broken connection at once) or when no
//      Heartbeat came for heartbeat_timeout_ms (a stopped or wedged process). The loss
//      is logged once with the rank, host, pid and the reason.
//   3. Gang semantics: losing a member of the current group ends that group. With
//      restarts left (max_restarts), the survivors form epoch+1 (Scale to each, ranks
//      renumbered densely in old-rank order) and a command in flight is re-issued to
//      them; without, every survivor gets Shutdown{exit_code=3, failed_rank} and a
//      pending run() throws errc::aborted naming the rank and reason.
//   4. Exchange (runtime::bootstrap through the supervisor) completes when every member
//      of the current epoch sent its blob for that key; stale epochs get an error.
//   5. Progress from members (worker_context::report_progress) is kept per rank for the
//      running command; a rank 3+ steps behind the fastest is logged as a straggler.
//   6. ExpertLoads from members (worker_context::report_expert_loads) feed one expert_balancer
//      (actors/expert_balancer.h) per group epoch and command; when a layer's imbalance persists
//      it sends PlacementUpdate{layer, version} to every member of the group. JoinReply tells
//      workers the EMA decay (experts.decay), so the supervisor's options are the only ones.
//   7. With keep_members (an elastic serving group), losing a member other than rank 0 ends
//      nothing: the group keeps its epoch, every surviving member gets MemberLost{epoch, rank,
//      reason} and rebuilds what it shared with that rank itself, the lost one gets Shutdown in
//      case it comes back, and a command in flight completes with the survivors' reports.
//   8. Late joins (keep_members and open_slots > 0): once the group formed, a Join with rank -1
//      and the cluster token gets the next launcher rank never used (world_size, world_size + 1,
//      ...) while fewer than open_slots late members are alive. The late member is monitored like
//      any other and comes after the group in members order (its group rank is its place there),
//      gets that group as a Scale of the current epoch and the running command; the group's
//      members are not told (they learn of it through what it publishes, invariant 9). A late
//      member takes part in no Exchange: it finds the others through Lookup. A command is sent to
//      the late members too, and one whose report says it failed is let go as a lost member (its
//      slot is free again; the others get MemberLost; the command does not fail for it).
//   9. Publish{key, blob} from a member is kept per (key, rank) and forwarded to every other
//      member alive as Published; Lookup{key, rank} is answered once that rank published the key,
//      and fails when the rank is lost (or was never a member).
#pragma once
#include <caf/all.hpp>

#include <string>
#include <vector>

#include "actors/messages.h"
#include "parallel/ep/ep_rebalance.h"

namespace troupe::actors {

struct supervisor_options {
  int world_size = 1;
  std::string cluster_token;
  int heartbeat_interval_ms = 500;   // told to workers in JoinReply
  int heartbeat_timeout_ms = 5000;   // silence longer than this = lost
  int join_timeout_ms = 60000;       // every rank must have joined by then
  int max_restarts = 0;              // group rebuilds allowed after losing members
  bool keep_members = false;         // invariant 7: a lost member leaves the group, which goes on
  int open_slots = 0;                // invariant 8: late members alive at once (with keep_members)
  // Expert placement (invariant 6): decay of the load EMA, imbalance threshold (native per-rank
  // max/mean), patience and cooldown in steps, the improvement a change must promise.
  bool rebalance_experts = true;
  parallel::ep::ep_rebalance_options experts;
};

// Exit codes a worker process uses after a Shutdown it did not ask for.
constexpr int exit_group_torn_down = 3;
constexpr int exit_supervisor_lost = 4;
constexpr int exit_join_refused = 5;

caf::actor spawn_supervisor(caf::actor_system& system, const supervisor_options& options);

// Blocking access to the supervisor from a thread outside the actor system (the job
// driver). Each call throws a runtime::error naming what failed.
class supervisor_client {
 public:
  supervisor_client(caf::actor_system& system, caf::actor supervisor);
  // Waits until every rank joined; returns the first group (epoch 1, all ranks).
  control::Scale wait_for_group(int timeout_ms);
  // Sends `cmd` to every member of the current group and returns their reports in
  // group-rank order (with keep_members, of the members still alive). Re-issued after a
  // rebuild; throws errc::aborted when the group is lost for good.
  std::vector<control::StatsReport> run(control::Command cmd, int timeout_ms);
  // The members' Join messages, in rank order (host, pid, device, backends).
  std::vector<control::Join> members(int timeout_ms = 10000);
  // The latest Progress of each rank for the running (or last) command, in rank order.
  std::vector<control::Progress> progress(int timeout_ms = 10000);
  // The last PlacementUpdate of each MoE layer for the running (or last) command, by layer.
  std::vector<control::PlacementUpdate> placements(int timeout_ms = 10000);
  void shutdown(const std::string& reason, int exit_code);

 private:
  caf::actor_system& system_;
  caf::actor supervisor_;
};

}  // namespace troupe::actors
