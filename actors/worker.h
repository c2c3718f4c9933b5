// actors/worker.h — the worker: one per process (rank), owning one device. Its actor
// speaks the control plane (join, heartbeats, commands, reports, group changes,
// shutdown) on CAF's scheduler; its compute thread runs the commands, so GPU launches,
// BLAS calls and blocking collectives never occupy a scheduler thread.
//
//   worker w(system, opts);
//   w.on(control::Command::RUN_SELFTEST, [](const control::Command& c, worker_context& ctx,
//                                           control::StatsReport& r) { ... });
//   w.join(supervisor);     // blocks until the supervisor accepts (or throws)
//   int code = w.wait();    // until Shutdown; non-zero when the group was torn down
//
// Invariants:
//   1. Heartbeats come from the actor, not the compute thread: a long command never
//      looks like a dead worker; a stopped or wedged process does.
//   2. When the group ends (Scale to a new epoch, Shutdown, or the supervisor's actor
//      going down) the communicator the running command registered with set_active()
//      is aborted with the reason, so a collective in flight throws errc::aborted
//      instead of hanging. Commands of an old epoch are dropped (the supervisor
//      re-issues them to the new group).
//   3. The compute thread is stopped and joined before wait() returns; if a command
//      ignores the abort for 10 s the process exits with the code anyway.
//   4. Expert placement (actors/expert_balancer.h): the worker keeps every PlacementUpdate of
//      the running command and group epoch (others are dropped), by layer and version, and a
//      load EMA per layer (decay from the supervisor's JoinReply); both start empty with each
//      command and each new group epoch.
//   5. MemberLost (supervisor.h invariant 7): the lost rank is remembered (lost_members()), the
//      command's on_member_lost callback runs on the actor's thread (it must not block), then the
//      communicators registered with set_loss_comms() whose members include it are aborted with
//      the reason. Both registrations end with the command.
//   6. Publish / Lookup (supervisor.h invariant 9): publish() never blocks; lookup() blocks until
//      the rank published the key (or was lost, or the timeout passed: errc::io naming the key and
//      rank); the command's on_published callback runs on the actor's thread for every value
//      another member publishes (it must not block) and ends with the command.
//   7. A worker made with rank -1 joins a running group late (supervisor.h invariant 8): rank() is
//      the rank the supervisor gave it, from the JoinReply on.
#pragma once
#include <caf/all.hpp>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/messages.h"
#include "runtime/bootstrap.h"
#include "runtime/communicator.h"

namespace troupe::actors {

struct worker_options {
  int rank = 0;
  int world_size = 1;
  std::string cluster_token;
  std::string host;                   // for the supervisor's logs
  std::string device = "cpu";
  std::vector<std::string> backends;  // communicator backends this process can run
  int join_timeout_ms = 60000;
  int exchange_timeout_ms = 120000;
};

struct worker_shared;

// What a command sees while it runs on the compute thread.
class worker_context {
 public:
  worker_context(std::shared_ptr<worker_shared> shared, int64_t epoch, std::vector<int> members);
  int rank() const;  // the launcher's rank
  int64_t epoch() const { return epoch_; }
  const std::vector<int>& members() const { return members_; }  // launcher ranks, group order
  int group_rank() const;
  int group_size() const { return static_cast<int>(members_.size()); }
  // An all_gather of blobs among this epoch's group, through the supervisor: how UCX
  // addresses and NCCL ids are exchanged when there is no MPI. `name` tells exchanges
  // apart ("ucx"); each call of all_gather is a new exchange.
  std::unique_ptr<runtime::bootstrap> bootstrap(const std::string& name);
  // Registers the communicator the command is using (nullptr to clear); it is aborted
  // when the group ends — at once if it already has.
  void set_active(runtime::communicator* c);
  void set_active(std::vector<runtime::communicator*> comms);  // several (a job's gradient and cp groups)
  // Sends a Progress to the supervisor (rank and epoch filled in); cheap, never blocks.
  void report_progress(control::Progress p);
  // Folds this step's rows per expert routed from this rank's tokens into the layer's EMA and
  // sends the EMA to the supervisor as ExpertLoads (rank, epoch, command filled in); never blocks.
  void report_expert_loads(int layer, int64_t step, const std::vector<int64_t>& loads);
  double expert_load_decay() const;
  // The newest placement version of `layer` received for this command (0 = none yet), and the
  // update of one version (nothing when it never arrived).
  int64_t placement_version(int layer) const;
  std::optional<control::PlacementUpdate> placement_update(int layer, int64_t version) const;
  bool group_over() const;  // a newer epoch or a shutdown arrived
  // Invariant 5. `members`: the launcher ranks the communicators `comms` connect (replaces the
  // earlier registration; empty clears it). Aborted at once when one of them is lost already.
  void set_loss_comms(std::vector<int> members, std::vector<runtime::communicator*> comms);
  void on_member_lost(std::function<void(int rank, const std::string& reason)> callback);
  std::vector<int> lost_members() const;  // launcher ranks lost while this group ran, in order
  // Invariant 6.
  void publish(const std::string& key, const std::string& blob);
  std::string lookup(const std::string& key, int rank, int timeout_ms);
  void on_published(std::function<void(const std::string& key, int rank, const std::string& blob)> callback);
  // This process's actor system (a command may spawn actors of its own, e.g. the serve scheduler).
  caf::actor_system& system() const;

 private:
  std::shared_ptr<worker_shared> shared_;
  int64_t epoch_;
  std::vector<int> members_;
};

using command_handler = std::function<void(const control::Command&, worker_context&, control::StatsReport&)>;

class worker {
 public:
  worker(caf::actor_system& system, worker_options options);
  ~worker();
  worker(const worker&) = delete;
  worker& operator=(const worker&) = delete;

  void on(control::Command::Kind kind, command_handler handler);  // before join()
  // Spawns the worker actor, which joins `supervisor`; blocks until accepted. Throws
  // errc::invalid_argument with the supervisor's reason when refused (wrong token…)
  // and errc::io when it does not answer within join_timeout_ms.
  void join(caf::actor supervisor);
  // Blocks until the worker is told to stop; returns the exit code (0 = clean).
  int wait();
  std::string exit_reason() const;
  caf::actor handle() const;
  int rank() const;  // the rank it joined as (invariant 7: given by the supervisor to a late join)

 private:
  std::shared_ptr<worker_shared> shared_;
};

}  // namespace troupe::actors
