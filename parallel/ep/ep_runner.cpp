// parallel/ep/ep_runner.cpp — see ep_runner.h.
#include "parallel/ep/ep_runner.h"

#include <algorithm>

#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;

ep_options ep_options_from_spec(const job::JobSpec& spec) { return ep_options_from(spec.parallel().expert()); }

ep_options ep_options_from(const job::ExpertParallel& x) {
  ep_options o;
  o.mode = x.mode().empty() ? ep_mode::llep : ep_mode_from(x.mode());
  if (x.lambda() > 0) o.llep.lambda = x.lambda();
  if (x.alpha() > 0) o.llep.alpha = x.alpha();
  if (x.min_chunk() > 0) o.llep.min_chunk = x.min_chunk();
  if (x.eplb_redundant_per_rank() > 0) o.eplb_redundant_per_rank = static_cast<int>(x.eplb_redundant_per_rank());
  return o;
}

ep_rebalance_options ep_rebalance_options_from_spec(const job::JobSpec& spec) {
  return ep_rebalance_options_from(spec.parallel().expert());
}

ep_rebalance_options ep_rebalance_options_from(const job::ExpertParallel& x) {
  const auto& r = x.rebalance();
  ep_rebalance_options o;
  if (r.threshold() > 0) o.threshold = r.threshold();
  if (r.patience() > 0) o.patience = static_cast<int>(r.patience());
  if (r.cooldown() > 0) o.cooldown = static_cast<int>(r.cooldown());
  if (r.decay() > 0) o.decay = r.decay();
  if (r.min_improvement() > 0) o.min_improvement = r.min_improvement();
  o.validate();
  return o;
}

ep_moe_runner::ep_moe_runner(ep_context ctx) : ctx_(std::move(ctx)) {
  TROUPE_CHECK(ctx_.tokens, errc::invalid_argument, "expert-parallel runner: no token communicator");
  ctx_.placement.validate();
}

void ep_moe_runner::forward(int64_t layer, float* out, const float* x, const layer_params& L, const model_config& c,
                            int64_t N) {
  ep_activations& a = acts_[layer];
  const ep_placement initial = ctx_.placement;
  ctx_.placement = placement(layer);
  std::swap(ctx_.replicas, replicas_[layer]);  // this layer's resident EPLB replicas
  std::swap(ctx_.replica_pairs, replica_pairs_[layer]);
  ep_moe_forward(out, a, x, L, c, N, ctx_);
  std::swap(ctx_.replicas, replicas_[layer]);
  std::swap(ctx_.replica_pairs, replica_pairs_[layer]);
  ctx_.placement = initial;
  stats_[layer] = ctx_.last;
  pending_backward_[layer] = true;
}

void ep_moe_runner::backward(int64_t layer, float* dx, layer_params& G, const float* dout, const float* x,
                             const layer_params& L, const model_config& c, int64_t N) {
  auto it = acts_.find(layer);
  TROUPE_CHECK(it != acts_.end() && pending_backward_[layer], errc::internal,
               "expert-parallel runner: backward of MoE layer {} without its forward", layer);
  ctx_.last = stats_[layer];
  const ep_placement initial = ctx_.placement;
  ctx_.placement = placement(layer);
  ep_moe_backward(dx, G, dout, it->second, x, L, c, N, ctx_);
  ctx_.placement = initial;
  stats_[layer] = ctx_.last;
  pending_backward_[layer] = false;
  acts_.erase(it);
}

const ep_placement& ep_moe_runner::placement(int64_t layer) const {
  auto it = layer_placement_.find(layer);
  return it == layer_placement_.end() ? ctx_.placement : it->second;
}

void ep_moe_runner::set_placement(int64_t layer, const ep_placement& p) {
  TROUPE_CHECK(p.ranks == ctx_.placement.ranks && p.experts() == ctx_.placement.experts(), errc::invalid_argument,
               "expert-parallel runner: new placement has {} experts on {} ranks, the group {} on {}", p.experts(),
               p.ranks, ctx_.placement.experts(), ctx_.placement.ranks);
  p.validate();
  acts_.erase(layer);
  pending_backward_.erase(layer);
  replicas_.erase(layer);
  replica_pairs_.erase(layer);
  layer_placement_[layer] = p;
}

const ep_step_stats& ep_moe_runner::layer_stats(int64_t layer) const {
  auto it = stats_.find(layer);
  TROUPE_CHECK(it != stats_.end(), errc::not_found, "expert-parallel runner: MoE layer {} has not run", layer);
  return it->second;
}

std::vector<int64_t> ep_moe_runner::step_loads() const {
  std::vector<int64_t> sum;
  for (const auto& [layer, s] : stats_) {
    if (sum.empty()) sum.assign(s.loads.size(), 0);
    for (size_t e = 0; e < s.loads.size() && e < sum.size(); ++e) sum[e] += s.loads[e];
  }
  return sum;
}

double ep_moe_runner::step_max_over_mean() const {
  std::vector<int64_t> rows;
  for (const auto& [layer, s] : stats_) {
    const auto r = s.plan.rank_rows();
    if (rows.empty()) rows.assign(r.size(), 0);
    for (size_t i = 0; i < r.size() && i < rows.size(); ++i) rows[i] += r[i];
  }
  int64_t total = 0, mx = 0;
  for (int64_t r : rows) total += r, mx = std::max(mx, r);
  return total == 0 ? 1.0 : static_cast<double>(mx) * static_cast<double>(rows.size()) / static_cast<double>(total);
}

size_t ep_moe_runner::step_weight_bytes() const {
  size_t b = 0;
  for (const auto& [layer, s] : stats_) b += s.weight_bytes_sent + s.weight_bytes_received;
  return b;
}

void ep_moe_runner::weights_changed() {
  replicas_.clear();
  replica_pairs_.clear();
}

void ep_moe_runner::release() {
  acts_.clear();
  pending_backward_.clear();
}

}  // namespace troupe::parallel::ep
