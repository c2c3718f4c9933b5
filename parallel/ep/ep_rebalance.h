// parallel/ep/ep_rebalance.h — when and how the native expert placement changes (issue #7,
// "supervisor placement"): a moving average of each expert's load, a persistence rule that
// fires when the native per-rank imbalance of that average lasts, a proposal that re-packs the
// experts by load with the same number of experts per rank, and the collective agreement on the
// step at which the ranks switch. Pure logic except ep_agree_placement_version (one all_reduce).
//
//   ep_load_tracker t(/*experts=*/8, /*decay=*/0.8);             // per rank (worker_context) or group
//   t.observe(rows_per_expert);                                   // after each step
//   ep_rebalancer rb(ep_placement::contiguous(8, 4), {.threshold = 1.25, .patience = 3});
//   if (auto p = rb.step(summed_ema)) broadcast(p->placement, rb.version());   // supervisor
//   int64_t v = ep_agree_placement_version(comm, latest_version_seen);       // every rank, step boundary
//   if (v > applied) ep_migrate(ep_expert_sets(L, c), old_placement, placement_of(v), comm);
//
// Invariants:
//   1. EMA: the first observation sets ema = loads; later ones ema = decay * ema + (1 - decay) *
//      loads (decay in [0, 1)). The EMA is linear, so the sum of the ranks' EMAs of their own tokens'
//      loads is the EMA of the group's loads.
//   2. Imbalance is the native per-rank max/mean of the EMA (ep_native_max_over_mean; 1 when all
//      loads are 0). The rule fires at the `patience`-th consecutive step with imbalance >
//      `threshold`; for `cooldown` steps after a change the rule does not count (streak stays 0).
//   3. A proposal keeps exactly E/P experts on every rank (the same weight memory per rank): experts
//      in descending load (ties: lower id) go to the open bin with the least load (ties: lower bin)
//      until it holds E/P (LPT). Bins are then matched to ranks to keep the most experts where they
//      are (an exact maximum-overlap assignment, Hungarian), and experts of
//      exactly equal load on different ranks are swapped when that keeps more of them home (which
//      leaves every rank's load unchanged). So `moved` counts only the experts that must travel.
//   4. A proposal is applied (version + 1, cooldown starts) only when it moves an expert and its
//      predicted max/mean <= current max/mean * (1 - min_improvement); otherwise nothing changes
//      and the rule tries again at the next step while the imbalance lasts.
//   5. Deterministic: the same loads and placement give the same proposal on every machine (no
//      randomness, no unordered containers, ties broken by index).
//   6. ep_agree_placement_version is a collective (one all_reduce over `comm`): every rank gets the
//      minimum of the versions the ranks have seen, so all switch together to a version that every
//      rank already holds.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "parallel/ep/ep_plan.h"
#include "runtime/communicator.h"

namespace troupe::parallel::ep {

struct ep_rebalance_options {
  double decay = 0.8;            // EMA decay (inv. 1); in [0, 1)
  double threshold = 1.25;       // imbalanced: native per-rank max/mean of the EMA above this
  int patience = 3;              // consecutive imbalanced steps before a change is proposed (>= 1)
  int cooldown = 10;             // steps after a change during which nothing is proposed (>= 0)
  double min_improvement = 0.1;  // relative: predicted <= current * (1 - min_improvement)

  // Throws errc::invalid_argument naming the option and its allowed range.
  void validate() const;
};

// Per-expert exponential moving average of loads (rows routed to each expert per step).
class ep_load_tracker {
 public:
  ep_load_tracker() = default;
  ep_load_tracker(int64_t experts, double decay);
  // loads: (E) rows per expert this step, >= 0; throws errc::invalid_argument on a size mismatch.
  void observe(const std::vector<int64_t>& loads);
  const std::vector<double>& ema() const { return ema_; }
  int64_t experts() const { return static_cast<int64_t>(ema_.size()); }
  int64_t steps() const { return steps_; }
  double decay() const { return decay_; }

 private:
  std::vector<double> ema_;
  double decay_ = 0.8;
  int64_t steps_ = 0;
};

// Max / mean over ranks of the summed loads of each rank's native experts (1 when all are 0).
double ep_native_max_over_mean(const std::vector<double>& loads, const ep_placement& placement);
// Each rank's summed load under `placement`.
std::vector<double> ep_rank_loads(const std::vector<double>& loads, const ep_placement& placement);

struct ep_rebalance_proposal {
  ep_placement placement;
  double before = 1.0;  // ep_native_max_over_mean(loads, current)
  double after = 1.0;   // ep_native_max_over_mean(loads, placement)
  int64_t moved = 0;    // experts whose rank changes
  std::string describe() const;  // "max/mean 2.800 -> 1.680, 3 of 8 experts move"
};

// Invariant 3. `current` must hold E/P experts on every rank; throws errc::invalid_argument
// naming the rank otherwise.
ep_rebalance_proposal ep_rebalance_propose(const std::vector<double>& loads, const ep_placement& current);

// The persistence rule and the current placement of one MoE layer (the supervisor keeps one per
// layer). Not thread-safe.
class ep_rebalancer {
 public:
  ep_rebalancer(ep_placement initial, ep_rebalance_options options);
  // One step's EMA loads of the whole group (E). Returns the applied proposal when the placement
  // changed at this step (invariants 2 and 4), nothing otherwise.
  std::optional<ep_rebalance_proposal> step(const std::vector<double>& ema);

  const ep_placement& placement() const { return placement_; }
  int64_t version() const { return version_; }          // 0 = the initial placement
  int streak() const { return streak_; }                // consecutive imbalanced steps
  int cooldown_left() const { return cooldown_left_; }
  double last_imbalance() const { return last_imbalance_; }  // of the last step, current placement
  int64_t steps() const { return steps_; }

 private:
  ep_placement placement_;
  ep_rebalance_options o_;
  int64_t version_ = 0, steps_ = 0;
  int streak_ = 0, cooldown_left_ = 0;
  double last_imbalance_ = 1.0;
};

// Invariant 6: every rank of `comm` calls it at the same step boundary with the newest placement
// version it has received; returns the minimum over the ranks (the version to switch to).
int64_t ep_agree_placement_version(runtime::communicator& comm, int64_t seen);

}  // namespace troupe::parallel::ep
