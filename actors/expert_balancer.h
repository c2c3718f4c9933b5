// actors/expert_balancer.h — supervisor-driven expert placement (issue #7): the supervisor's
// balancer, which sums the workers' ExpertLoads of each step and runs the persistence rule of
// parallel/ep/ep_rebalance.h per MoE layer, and the worker's side of a placement switch.
//
//   // supervisor (actors/supervisor.cpp owns one):
//   expert_balancer b(opts.experts);
//   b.reset(group_epoch, group_size, command_id);
//   for (auto& u : b.add(group_rank, loads_msg)) send_to_every_member(u);
//
//   // worker, in a command's step loop (every rank of comm, after each step's forward):
//   ctx.report_expert_loads(layer, step, rows_of_my_tokens_per_expert);
//   expert_placement_state st{ep_placement::contiguous(E, P)};
//   if (switch_expert_placement(ctx, comm, layer, st, ep_expert_sets(L, cfg))) { /* st.placement */ }
//
// Invariants:
//   1. A step of a layer counts once every member of the group reported it (the sum of the ranks'
//      EMAs is the group's EMA, ep_rebalance.h inv. 1). Reports are per (group epoch, command): a
//      new group or a new command starts every layer again from the contiguous placement, version 0.
//   2. The expert-parallel group is the whole worker group (P = group size, ranks = group ranks).
//      A layer's placement starts as ep_placement::contiguous(E, P), as the workers' does; E must
//      be a multiple of P (else the layer is logged once and left alone). Versions count 1, 2, ...
//      per layer.
//   3. Reports that are malformed (expert count changing, a rank twice for one step, a step older
//      than the last completed one) are dropped with a warning; they never change a placement.
//      At most 64 incomplete steps wait per layer (the oldest is dropped beyond that).
//   4. switch_expert_placement is collective over `comm` (one all_reduce, then ep_migrate when the
//      agreed version is newer); every rank switches at the same step to the same placement.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "actors/messages.h"
#include "actors/worker.h"
#include "parallel/ep/ep_layer.h"
#include "parallel/ep/ep_rebalance.h"

namespace troupe::actors {

namespace ep = parallel::ep;

class expert_balancer {
 public:
  explicit expert_balancer(ep::ep_rebalance_options options = {});
  // A new group or command: forget every layer (invariant 1).
  void reset(int64_t group_epoch, int group_size, int64_t command_id);
  // One member's report, `group_rank` its rank in the group. Returns the placement changes to send
  // to every member (none or one).
  std::vector<control::PlacementUpdate> add(int group_rank, const control::ExpertLoads& report);
  // The last change of each layer (ascending layer), for the driver and tests.
  std::vector<control::PlacementUpdate> latest() const;
  const ep::ep_rebalance_options& options() const { return o_; }

 private:
  struct pending_step {
    std::vector<double> sum;
    std::vector<bool> have;
    int count = 0;
  };
  struct layer_state {
    std::optional<ep::ep_rebalancer> rule;  // empty when the layer is left alone
    int64_t experts = 0;
    int64_t last_step = -1;                 // the last completed step
    std::map<int64_t, pending_step> pending;
    std::optional<control::PlacementUpdate> latest;
  };
  ep::ep_rebalance_options o_;
  int64_t group_epoch_ = 0, command_id_ = 0;
  int group_size_ = 0;
  std::map<int, layer_state> layers_;
};

// A placement as a message (one replica per expert, share 1) and back.
control::PlacementUpdate placement_update_of(const ep::ep_placement& p, int layer, int64_t version);
// Throws errc::invalid_argument naming the layer and the bad replica (expert twice or missing, rank
// out of range).
ep::ep_placement placement_of(const control::PlacementUpdate& u);

// What a worker's command keeps per MoE layer.
struct expert_placement_state {
  ep::ep_placement placement;  // the one the layer runs with
  int64_t version = 0;         // 0 = the initial contiguous placement
  int64_t switches = 0;
  size_t bytes_sent = 0;       // by ep_migrate, this rank, all switches
};

// Invariant 4: at a step boundary every rank of `comm` agrees on the newest version all have seen
// (worker_context::placement_version) and, when it is newer than st.version, moves the expert
// tensors of `sets` (ep_migrate) and updates `st`. Returns true when the placement changed.
bool switch_expert_placement(worker_context& ctx, runtime::communicator& comm, int layer,
                             expert_placement_state& st, const std::vector<ep::ep_expert_tensors>& sets);

}  // namespace troupe::actors
