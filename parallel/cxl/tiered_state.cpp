// parallel/cxl/tiered_state.cpp — group memory on the tiers and re-homed weight sets (tiered_state.h).
#include "parallel/cxl/tiered_state.h"

#include <algorithm>
#include <cstring>

#include "runtime/error.h"
#include "runtime/job_spec.h"

namespace troupe::parallel::cxl {

using runtime::errc;
using runtime::tensor;

namespace {

size_t aligned(size_t n) { return (n + kTensorAlign - 1) / kTensorAlign * kTensorAlign; }

}  // namespace

// One group's tier allocation; unregistered (invariant 3) and freed when the last view goes.
struct tiered_group_memory::block {
  runtime::tier_allocation a;
  bool registered = false;
  block() = default;
  block(const block&) = delete;
  block& operator=(const block&) = delete;
  ~block() {
    if (registered) runtime::unregister_tier_range(a.ptr);
    runtime::tier_free(a);
  }
};

int64_t tiered_bytes(const model_weights& w) {
  size_t n = 0;
  for (const auto& [name, t] : w.parameters()) n += aligned(t.nbytes());
  return static_cast<int64_t>(n);
}

runtime::tier_access group_access(const group_placement& g, const std::vector<runtime::memory_tier>& tiers) {
  runtime::tier_access a;
  if (g.cxl_bytes <= 0 || g.bytes <= 0) return a;
  for (const std::string& name : g.tiers) {
    auto it = std::find_if(tiers.begin(), tiers.end(), [&](const runtime::memory_tier& t) { return t.name == name; });
    if (it == tiers.end() || it->type != runtime::memory_tier::cxl || !it->emulated) continue;
    a.cxl_fraction = static_cast<double>(g.cxl_bytes) / static_cast<double>(g.bytes);
    a.gbps = it->emulated_gbps;
    a.latency_ns = it->emulated_latency_ns;
    break;
  }
  return a;
}

void rehome_weights(model_weights& w, void* base, size_t bytes, std::shared_ptr<void> owner) {
  const auto need = static_cast<size_t>(tiered_bytes(w));
  TROUPE_CHECK(base != nullptr && bytes >= need, errc::invalid_argument,
               "rehome_weights: {} bytes at {} cannot hold the {} bytes of the set's {} parameters", bytes, base, need,
               w.parameters().size());
  TROUPE_CHECK(reinterpret_cast<uintptr_t>(base) % kTensorAlign == 0, errc::invalid_argument,
               "rehome_weights: base {} is not {}-byte aligned", base, kTensorAlign);
  auto* p = static_cast<std::byte*>(base);
  size_t off = 0;
  for (auto& ref : w.parameters()) {
    tensor& t = ref.value;
    TROUPE_CHECK(t.is_contiguous() && t.device().is_cpu(), errc::invalid_argument,
                 "rehome_weights: parameter {} ({}) is not a contiguous cpu tensor", ref.name, t.describe());
    std::memcpy(p + off, t.data_ptr(), t.nbytes());
    t = tensor::from_blob(p + off, t.shape(), t.dtype(), runtime::device::cpu(), owner);
    off += aligned(t.nbytes());
  }
}

std::vector<group> fp32_training_groups(const model_weights& w, int64_t activation_host_bytes) {
  const int64_t s = tiered_bytes(w);
  return {{"momentum", 1, s},        {"variance", 1, s},
          {"master_grads", 1, s},    {"master_weights", 1, s},
          {"compute_weights", 2, 0}, {"activations", 3, activation_host_bytes},
          {"compute_grads", 4, 0}};
}

placement_plan place_job(const job::JobSpec& spec, const model_weights& w, int64_t activation_host_bytes,
                         const std::vector<runtime::memory_tier>& tiers) {
  const std::string policy = runtime::job_host_placement(spec);
  TROUPE_CHECK(!policy.empty(), errc::invalid_argument,
               "place_job: the job places no host memory (set memory.placement or declare memory.tiers)");
  return place(fp32_training_groups(w, activation_host_bytes), tiers, runtime::job_local_dram_budget(spec, tiers),
               parse_policy(policy));
}

tiered_group_memory::tiered_group_memory(placement_plan plan, std::vector<runtime::memory_tier> tiers)
    : plan_(std::move(plan)), tiers_(std::move(tiers)) {}

tiered_group_memory::~tiered_group_memory() = default;

void tiered_group_memory::rehome(const std::string& group, model_weights& w) {
  const group_placement& g = plan_[group];
  TROUPE_CHECK(allocation(group) == nullptr, errc::invalid_argument,
               "tiered_group_memory: group '{}' already holds a weight set", group);
  const int64_t need = tiered_bytes(w);
  TROUPE_CHECK(need <= g.bytes, errc::invalid_argument,
               "tiered_group_memory: the set for group '{}' needs {} bytes, the plan gave it {}", group, need, g.bytes);
  auto b = std::make_shared<block>();
  b->a = runtime::tier_alloc(static_cast<size_t>(need), g.where);
  // A fallback (a full node, mbind refused) was logged by tier_alloc and shows in allocation(group).
  const runtime::tier_access acc = group_access(g, tiers_);
  if (acc.cxl_fraction > 0) {
    runtime::register_tier_range(b->a.ptr, b->a.bytes, acc);
    b->registered = true;
  }
  rehome_weights(w, b->a.ptr, b->a.bytes, b);
  blocks_.emplace_back(group, std::move(b));
}

const runtime::tier_allocation* tiered_group_memory::allocation(const std::string& group) const {
  for (const auto& [name, b] : blocks_)
    if (name == group) return &b->a;
  return nullptr;
}

}  // namespace troupe::parallel::cxl
