// parallel/ep/ep_runner.h — the expert-parallel MoE layer as the decoder's moe_runner: one
// ep_activations per MoE layer, the plan and loads of the last step per layer (for metrics and the
// supervisor's expert placement), and a way to switch the native placement between steps.
//
//   ep_moe_runner ep({.tokens = ep_comm, .placement = ep_placement::contiguous(E, P),
//                     .options = {.mode = ep_mode::llep}});
//   dec.set_expert_parallel(&ep);          // every MoE layer now runs across the group
//   dec.forward_backward(...);             // all ranks together
//   ep.layer_stats(l).loads;  ep.step_loads();   // rows per expert, summed over MoE layers
//
// Invariants:
//   1. Calls for one layer alternate forward, backward (or forward only); a backward without
//      its forward throws errc::internal.
//   2. The weights the decoder passes hold at least this rank's native experts under
//      placement() (ep_layer.h invariant 3); a trainer may keep all experts (replicated).
//   3. Each MoE layer has its own native placement (the supervisor re-packs layers separately),
//      the context's until set_placement(layer, p); it takes effect at that layer's next forward,
//      and the caller moves the expert tensors (ep_migrate) on every rank first.
#pragma once
#include <map>
#include <vector>

#include "parallel/ep/ep_layer.h"
#include "parallel/ep/ep_rebalance.h"
#include "runtime/proto/job.pb.h"

namespace troupe::parallel::ep {

// parallel.expert of a job spec; zeros mean the defaults (ep_plan.h / ep_layer.h).
ep_options ep_options_from_spec(const job::JobSpec& spec);
ep_options ep_options_from(const job::ExpertParallel& x);  // the same message in a serve spec
// parallel.expert.rebalance (enabled is read separately); zeros mean the defaults.
ep_rebalance_options ep_rebalance_options_from_spec(const job::JobSpec& spec);
ep_rebalance_options ep_rebalance_options_from(const job::ExpertParallel& x);  // a serve spec's

class ep_moe_runner final : public moe_runner {
 public:
  explicit ep_moe_runner(ep_context ctx);

  void forward(int64_t layer, float* out, const float* x, const layer_params& L, const model_config& c,
               int64_t N) override;
  void backward(int64_t layer, float* dx, layer_params& G, const float* dout, const float* x, const layer_params& L,
                const model_config& c, int64_t N) override;

  const ep_placement& placement() const { return ctx_.placement; }  // the initial one
  const ep_placement& placement(int64_t layer) const;
  void set_placement(int64_t layer, const ep_placement& p);
  const ep_options& options() const { return ctx_.options; }
  // The last forward (and backward) of MoE layer `layer`; throws errc::not_found before one ran.
  const ep_step_stats& layer_stats(int64_t layer) const;
  // Rows per expert over every MoE layer's last forward (empty before any).
  std::vector<int64_t> step_loads() const;
  // Max/mean rows per rank of the last step's plans, summed over MoE layers (1 before any).
  double step_max_over_mean() const;
  // Weight bytes this rank sent + received in the last step's layers.
  size_t step_weight_bytes() const;
  // Drops every layer's activations (after an evaluation, before a placement change).
  void release();
  // The weights changed (an optimizer step): EPLB's resident replicas are fetched again.
  void weights_changed();

 private:
  ep_context ctx_;
  std::map<int64_t, ep_activations> acts_;
  std::map<int64_t, ep_step_stats> stats_;
  std::map<int64_t, bool> pending_backward_;
  std::map<int64_t, ep_placement> layer_placement_;
  std::map<int64_t, std::map<int, std::vector<runtime::tensor>>> replicas_;  // EPLB, per layer
  std::map<int64_t, std::set<std::pair<int, int>>> replica_pairs_;
};

}  // namespace troupe::parallel::ep
