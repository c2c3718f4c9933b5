// parallel/cxl/placement.cpp — latency-first placement and its baselines (placement.h).
#include "parallel/cxl/placement.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>

#include "runtime/error.h"

namespace troupe::parallel::cxl {

using runtime::errc;
using runtime::memory_tier;
using runtime::placement;

namespace {

std::string gib(int64_t b) { return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0)); }

struct tier_nodes {
  const memory_tier* tier;
  int node;
};

// `bytes` split evenly over `nodes` (remainder to the first), appended to g.shares.
void spread(group_placement& g, const std::vector<tier_nodes>& nodes, int64_t bytes) {
  if (bytes == 0 || nodes.empty()) return;
  const auto n = static_cast<int64_t>(nodes.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t share = bytes / n + (i < bytes % n ? 1 : 0);
    const auto& tn = nodes[static_cast<size_t>(i)];
    g.shares.push_back({tn.tier->name, tn.node, share});
    if (std::find(g.tiers.begin(), g.tiers.end(), tn.tier->name) == g.tiers.end()) g.tiers.push_back(tn.tier->name);
  }
}

std::vector<int> node_ids(const std::vector<tier_nodes>& v) {
  std::vector<int> out;
  for (const auto& x : v) out.push_back(x.node);
  return out;
}

// The placement for tier_alloc: one node bound, several interleaved; weights when given.
placement where_of(const std::vector<tier_nodes>& nodes, placement::mode how, std::vector<int64_t> weights = {}) {
  placement p;
  p.nodes = node_ids(nodes);
  p.how = p.nodes.size() == 1 ? placement::bind : how;
  if (p.how == placement::interleave) p.weights = std::move(weights);
  return p;
}

}  // namespace

const char* policy_name(placement_policy p) {
  switch (p) {
    case placement_policy::latency_first: return "latency_first";
    case placement_policy::dram_only: return "dram_only";
    case placement_policy::interleave_all: return "interleave_all";
    case placement_policy::cxl_only: return "cxl_only";
  }
  return "?";
}

placement_policy parse_policy(const std::string& name) {
  for (auto p : {placement_policy::latency_first, placement_policy::dram_only, placement_policy::interleave_all,
                 placement_policy::cxl_only})
    if (name == policy_name(p)) return p;
  TROUPE_THROW(errc::invalid_argument,
               "placement policy '{}' is unknown; use latency_first, dram_only, interleave_all or cxl_only", name);
}

std::vector<group> training_groups(int64_t params, int64_t activation_bytes, int master_bytes, int compute_bytes) {
  TROUPE_CHECK(params >= 0 && activation_bytes >= 0 && master_bytes > 0 && compute_bytes > 0, errc::invalid_argument,
               "training_groups: params {}, activation_bytes {}, master_bytes {}, compute_bytes {} must be >= 0 "
               "(bytes per element > 0)", params, activation_bytes, master_bytes, compute_bytes);
  const int64_t m = params * master_bytes, c = params * compute_bytes;
  return {{"momentum", 1, m},        {"variance", 1, m},        {"master_grads", 1, m},
          {"master_weights", 1, m},  {"compute_weights", 2, c}, {"activations", 3, activation_bytes},
          {"compute_grads", 4, c}};
}

const group_placement& placement_plan::operator[](const std::string& name) const {
  for (const auto& g : groups)
    if (g.name == name) return g;
  TROUPE_THROW(errc::not_found, "placement plan has no group '{}'", name);
}

placement_plan place(const std::vector<group>& groups_in, const std::vector<memory_tier>& tiers,
                     int64_t local_dram_budget, placement_policy policy) {
  const char* pname = policy_name(policy);
  TROUPE_CHECK(local_dram_budget >= 0, errc::invalid_argument, "place ({}): local DRAM budget {} is negative", pname,
               local_dram_budget);
  std::vector<group> groups = groups_in;
  for (const auto& g : groups)
    TROUPE_CHECK(g.priority >= 1 && g.priority <= 4 && g.bytes >= 0, errc::invalid_argument,
                 "place ({}): group '{}' has priority {} (1..4) and {} bytes (>= 0)", pname, g.name, g.priority,
                 g.bytes);
  std::stable_sort(groups.begin(), groups.end(), [](const group& a, const group& b) { return a.priority < b.priority; });

  const memory_tier* dram_tier = nullptr;
  std::vector<tier_nodes> dram, cxl_nodes;
  for (const auto& t : tiers) {
    TROUPE_CHECK(!t.numa_nodes.empty(), errc::invalid_argument, "place ({}): tier '{}' has no NUMA nodes", pname,
                 t.name);
    if (t.type == memory_tier::dram && dram_tier == nullptr) {
      dram_tier = &t;
      for (int n : t.numa_nodes) dram.push_back({&t, n});
    } else if (t.type == memory_tier::cxl) {
      for (int n : t.numa_nodes) cxl_nodes.push_back({&t, n});
    }
  }
  int64_t total = 0;
  for (const auto& g : groups) total += g.bytes;
  const bool needs_dram = total > 0 && (policy == placement_policy::dram_only ||
                                        policy == placement_policy::interleave_all ||
                                        (policy == placement_policy::latency_first && local_dram_budget > 0));
  const bool needs_cxl = policy == placement_policy::cxl_only || policy == placement_policy::interleave_all ||
                         (policy == placement_policy::latency_first && total > local_dram_budget);
  TROUPE_CHECK(!needs_dram || dram_tier != nullptr, errc::invalid_argument,
               "place ({}): no dram tier among the {} tiers given; declare one (memory.tiers, kind: dram)", pname,
               tiers.size());
  TROUPE_CHECK(!needs_cxl || !cxl_nodes.empty(), errc::invalid_argument,
               "place ({}): {} must go to CXL but no cxl tier is given; declare one (memory.tiers, kind: cxl — "
               "an emulated one on a DRAM node works) or use dram_only",
               pname, policy == placement_policy::latency_first ? gib(total - local_dram_budget) : gib(total));
  if (policy == placement_policy::latency_first && dram_tier != nullptr)
    TROUPE_CHECK(local_dram_budget <= dram_tier->capacity_bytes, errc::invalid_argument,
                 "place ({}): local DRAM budget {} exceeds tier '{}' capacity {}; lower the budget", pname,
                 gib(local_dram_budget), dram_tier->name, gib(dram_tier->capacity_bytes));

  std::vector<tier_nodes> all = dram;
  all.insert(all.end(), cxl_nodes.begin(), cxl_nodes.end());

  placement_plan plan;
  plan.policy = policy;
  plan.local_dram_budget = local_dram_budget;
  int64_t left = local_dram_budget;  // latency_first: DRAM budget not yet used
  for (const auto& gin : groups) {
    group_placement g;
    g.name = gin.name;
    g.priority = gin.priority;
    g.bytes = gin.bytes;
    switch (policy) {
      case placement_policy::dram_only:
        g.dram_bytes = g.bytes;
        g.where = where_of(dram, placement::bind);
        g.where.how = placement::bind;
        spread(g, dram, g.bytes);
        break;
      case placement_policy::cxl_only:
        g.cxl_bytes = g.bytes;
        g.where = where_of(cxl_nodes, placement::interleave);
        spread(g, cxl_nodes, g.bytes);
        break;
      case placement_policy::interleave_all: {
        // Even page interleave: each node gets bytes / n.
        g.where = where_of(all, placement::interleave);
        spread(g, all, g.bytes);
        for (size_t i = 0; i < g.shares.size(); ++i) (i < dram.size() ? g.dram_bytes : g.cxl_bytes) += g.shares[i].bytes;
        break;
      }
      case placement_policy::latency_first:
        if (g.bytes <= left) {  // fits: bound to local DRAM
          g.dram_bytes = g.bytes;
          g.where = where_of(dram, placement::bind);
          g.where.how = placement::bind;
          spread(g, dram, g.bytes);
          left -= g.bytes;
        } else if (left > 0) {  // straddles: weighted interleave, DRAM gets exactly what is left
          g.straddles = true;
          g.dram_bytes = left;
          g.cxl_bytes = g.bytes - left;
          std::vector<int64_t> weights;
          for (size_t i = 0; i < dram.size(); ++i)
            weights.push_back(left / static_cast<int64_t>(dram.size()));
          for (size_t i = 0; i < cxl_nodes.size(); ++i)
            weights.push_back(g.cxl_bytes / static_cast<int64_t>(cxl_nodes.size()));
          g.where = where_of(all, placement::interleave, weights);
          spread(g, dram, g.dram_bytes);
          spread(g, cxl_nodes, g.cxl_bytes);
          left = 0;
        } else {  // after the budget: striped over every CXL node
          g.cxl_bytes = g.bytes;
          g.where = where_of(cxl_nodes, placement::interleave);
          spread(g, cxl_nodes, g.bytes);
        }
        break;
    }
    // What a GPU copies from (compute weights, offloaded activations, compute grads) is pinned
    // when CUDA runs (runtime/tier_alloc.h invariant 5); the optimizer's fp32 state is not.
    g.where.pin = g.priority >= 2;
    plan.dram_bytes += g.dram_bytes;
    plan.cxl_bytes += g.cxl_bytes;
    plan.groups.push_back(std::move(g));
  }

  // Capacity per tier (invariant 4).
  std::map<std::string, int64_t> held;
  for (const auto& g : plan.groups)
    for (const auto& s : g.shares) held[s.tier] += s.bytes;
  for (const auto& t : tiers) {
    const int64_t h = held.count(t.name) ? held[t.name] : 0;
    TROUPE_CHECK(h <= t.capacity_bytes, errc::invalid_argument,
                 "place ({}): tier '{}' ({}) would hold {} ({} bytes) but its capacity is {} ({} bytes); {}", pname,
                 t.name, runtime::tier_kind_name(t.type), gib(h), h, gib(t.capacity_bytes), t.capacity_bytes,
                 t.type == memory_tier::cxl ? "add CXL capacity or raise the local DRAM budget"
                                            : "lower the budget or use a policy that sends more to CXL");
  }
  return plan;
}

std::string describe(const placement_plan& plan) {
  std::string out = fmt::format("host placement: {} (local DRAM budget {}): {} DRAM, {} CXL\n",
                                policy_name(plan.policy), gib(plan.local_dram_budget), gib(plan.dram_bytes),
                                gib(plan.cxl_bytes));
  for (const auto& g : plan.groups) {
    const std::string nodes = fmt::format("{}", fmt::join(g.where.nodes, ","));
    const std::string tiers = fmt::format("{}", fmt::join(g.tiers, "+"));
    out += fmt::format("  {}. {:<16} {:>11}  {:<10} {:<10} nodes {{{}}}  DRAM {} / CXL {}{}\n", g.priority, g.name,
                       gib(g.bytes), tiers.empty() ? "-" : tiers,
                       g.where.how == placement::bind ? "bind" : (g.where.weights.empty() ? "interleave" : "weighted"),
                       nodes, gib(g.dram_bytes), gib(g.cxl_bytes), g.straddles ? "  (straddles the budget)" : "");
  }
  return out;
}

}  // namespace troupe::parallel::cxl
