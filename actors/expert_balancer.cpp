// actors/expert_balancer.cpp — see expert_balancer.h (the supervisor's side; the worker's
// switch_expert_placement lives in expert_switch.cpp, the only part that needs ep_migrate).
#include "actors/expert_balancer.h"

#include <fmt/format.h>

#include <cmath>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;

expert_balancer::expert_balancer(ep::ep_rebalance_options options) : o_(options) { o_.validate(); }

void expert_balancer::reset(int64_t group_epoch, int group_size, int64_t command_id) {
  group_epoch_ = group_epoch;
  group_size_ = group_size;
  command_id_ = command_id;
  layers_.clear();
}

std::vector<control::PlacementUpdate> expert_balancer::add(int group_rank, const control::ExpertLoads& r) {
  const int layer = r.layer();
  const int64_t E = r.ema_size();
  if (r.epoch() != group_epoch_ || r.command_id() != command_id_ || group_size_ <= 0) return {};
  if (group_rank < 0 || group_rank >= group_size_ || E == 0 || r.step() < 0) {
    log::warn("expert balancer: dropped a report from group rank {} (layer {}, step {}, {} experts)", group_rank,
              layer, r.step(), E);
    return {};
  }
  auto [it, fresh] = layers_.try_emplace(layer);
  layer_state& ls = it->second;
  if (fresh) {
    ls.experts = E;
    if (E % group_size_ == 0)
      ls.rule.emplace(ep::ep_placement::contiguous(E, group_size_), o_);
    else
      log::warn("expert balancer: layer {} has {} experts, not a multiple of the {} ranks; its placement stays",
                layer, E, group_size_);
  }
  if (E != ls.experts || r.step() <= ls.last_step) {
    log::warn("expert balancer: dropped rank {}'s report of layer {} step {} ({} experts; the layer has {}, last "
              "step {})",
              group_rank, layer, r.step(), E, ls.experts, ls.last_step);
    return {};
  }
  for (double x : r.ema())
    if (!(x >= 0.0) || !std::isfinite(x)) {
      log::warn("expert balancer: dropped rank {}'s report of layer {} step {}: load {} is not a finite count",
                group_rank, layer, r.step(), x);
      return {};
    }
  constexpr size_t max_pending = 64;  // a rank that stopped reporting must not grow this forever
  if (!ls.pending.count(r.step()) && ls.pending.size() >= max_pending) {
    log::warn("expert balancer: layer {}: {} steps wait for reports; dropping step {} (a rank is not reporting)",
              layer, ls.pending.size(), ls.pending.begin()->first);
    ls.pending.erase(ls.pending.begin());
  }
  auto& ps = ls.pending[r.step()];
  if (ps.sum.empty()) {
    ps.sum.assign(static_cast<size_t>(E), 0.0);
    ps.have.assign(static_cast<size_t>(group_size_), false);
  }
  if (ps.have[static_cast<size_t>(group_rank)]) {
    log::warn("expert balancer: group rank {} reported layer {} step {} twice; the second is dropped", group_rank,
              layer, r.step());
    return {};
  }
  ps.have[static_cast<size_t>(group_rank)] = true;
  ++ps.count;
  for (int64_t e = 0; e < E; ++e) ps.sum[static_cast<size_t>(e)] += r.ema(static_cast<int>(e));
  if (ps.count < group_size_) return {};

  // Step complete (they complete in step order: each rank reports its steps in order).
  const std::vector<double> ema = std::move(ps.sum);
  ls.pending.erase(ls.pending.begin(), ls.pending.upper_bound(r.step()));
  ls.last_step = r.step();
  if (!ls.rule) return {};
  const auto change = ls.rule->step(ema);
  if (!change) return {};
  auto u = placement_update_of(change->placement, layer, ls.rule->version());
  u.set_group_epoch(group_epoch_);
  u.set_command_id(command_id_);
  u.set_step(r.step());
  u.set_max_over_mean_before(change->before);
  u.set_max_over_mean_after(change->after);
  log::info("expert balancer: layer {} placement v{} after step {}: {}", layer, ls.rule->version(), r.step(),
            change->describe());
  ls.latest = u;
  return {u};
}

std::vector<control::PlacementUpdate> expert_balancer::latest() const {
  std::vector<control::PlacementUpdate> out;
  for (const auto& [layer, ls] : layers_)
    if (ls.latest) out.push_back(*ls.latest);
  return out;
}

control::PlacementUpdate placement_update_of(const ep::ep_placement& p, int layer, int64_t version) {
  control::PlacementUpdate u;
  u.set_epoch(version);
  u.set_layer(layer);
  u.set_num_experts(static_cast<int32_t>(p.experts()));
  u.set_num_ranks(p.ranks);
  for (int64_t e = 0; e < p.experts(); ++e) {
    auto* rep = u.add_replicas();
    rep->set_expert(static_cast<int32_t>(e));
    rep->set_rank(p.native[static_cast<size_t>(e)]);
    rep->set_share(1.0);
  }
  return u;
}

ep::ep_placement placement_of(const control::PlacementUpdate& u) {
  TROUPE_CHECK(u.num_experts() >= 1 && u.num_ranks() >= 1, errc::invalid_argument,
               "placement update v{} of layer {}: {} experts on {} ranks", u.epoch(), u.layer(), u.num_experts(),
               u.num_ranks());
  TROUPE_CHECK(u.replicas_size() == u.num_experts(), errc::invalid_argument,
               "placement update v{} of layer {}: {} replicas for {} experts; only one replica per expert (a "
               "native placement) is supported here",
               u.epoch(), u.layer(), u.replicas_size(), u.num_experts());
  ep::ep_placement p;
  p.ranks = u.num_ranks();
  p.native.assign(static_cast<size_t>(u.num_experts()), -1);
  for (const auto& rep : u.replicas()) {
    TROUPE_CHECK(rep.expert() >= 0 && rep.expert() < u.num_experts() && p.native[static_cast<size_t>(rep.expert())] < 0,
                 errc::invalid_argument, "placement update v{} of layer {}: expert {} is out of range or given twice",
                 u.epoch(), u.layer(), rep.expert());
    p.native[static_cast<size_t>(rep.expert())] = rep.rank();
  }
  p.validate();
  return p;
}

}  // namespace troupe::actors
