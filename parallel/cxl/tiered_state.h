// parallel/cxl/tiered_state.h — a training job's host state where its placement plan puts it
// (placement.h): one tier allocation per placed group, and model_weights sets moved into them.
//
//   placement_plan plan = place(groups, tiers, budget, placement_policy::latency_first);
//   tiered_group_memory mem(plan, tiers);
//   mem.rehome("momentum", opt.exp_avg());     // copied; the handles now view the group's memory
//   mem.rehome("master_weights", weights);
//   runtime::policy_of(opt.exp_avg().embed.data_ptr());   // MPOL_BIND (2) for a group bound to DRAM
//   mem.allocation("momentum")->policy;                   // "bind", "interleave", "striped", "default"
//
// Invariants:
//   1. rehome(group, w) allocates the group's memory once (runtime::tier_alloc with the plan's
//      placement; tiered_bytes(w) bytes, which must not exceed the group's planned bytes), copies
//      every parameter to consecutive 64-byte aligned offsets in parameters() order, and replaces
//      each handle with a tensor::from_blob view whose owner keeps the allocation alive. Names,
//      shapes and values are unchanged (bitwise).
//   2. Handles are replaced, not written through: re-home a set before anything keeps a handle to
//      its tensors (grad_sync's buckets, a decoder's cached pointers).
//   3. The memory is freed (tier_free) when the tiered_group_memory and every view of it are gone;
//      a range registered in the tier registry is unregistered just before.
//   4. A group the plan puts partly on an emulated CXL tier is registered (runtime/tier_registry.h)
//      with group_access: cxl_fraction = its CXL bytes / its bytes, gbps and latency of the first
//      emulated cxl tier it lands on. DRAM-only groups and real CXL are not registered.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/cxl/placement.h"
#include "parallel/model/model_weights.h"
#include "runtime/memory_tiers.h"
#include "runtime/proto/job.pb.h"
#include "runtime/tier_alloc.h"
#include "runtime/tier_registry.h"

namespace troupe::parallel::cxl {

inline constexpr size_t kTensorAlign = 64;

// Bytes a weight set takes re-homed: each parameter rounded up to kTensorAlign.
int64_t tiered_bytes(const model_weights& w);

// What an access to group g costs under emulation (invariant 4); all zero when none of g is on an
// emulated CXL tier.
runtime::tier_access group_access(const group_placement& g, const std::vector<runtime::memory_tier>& tiers);

// Copies w's parameters into [base, base + bytes) (invariant 1's layout) and rebinds the handles
// to views of it that keep `owner` alive.
void rehome_weights(model_weights& w, void* base, size_t bytes, std::shared_ptr<void> owner);

// A training job's host groups (placement.h invariant 1) with its real sizes, fp32 training:
// momentum, variance, master grads and master weights tiered_bytes(w) each; no separate
// compute-precision weights or grads (0 bytes: fp32 training computes on the master copies);
// activations = MEMO's host bytes (0 without memo).
std::vector<group> fp32_training_groups(const model_weights& w, int64_t activation_host_bytes);

// The job's placement (memory.placement, memory.local_dram_budget; runtime::job_host_placement
// must be non-empty) of fp32_training_groups on `tiers` (runtime::tiers_from_spec).
placement_plan place_job(const job::JobSpec& spec, const model_weights& w, int64_t activation_host_bytes,
                         const std::vector<runtime::memory_tier>& tiers);

class tiered_group_memory {
 public:
  tiered_group_memory(placement_plan plan, std::vector<runtime::memory_tier> tiers);
  ~tiered_group_memory();
  tiered_group_memory(const tiered_group_memory&) = delete;
  tiered_group_memory& operator=(const tiered_group_memory&) = delete;

  const placement_plan& plan() const { return plan_; }
  const std::vector<runtime::memory_tier>& tiers() const { return tiers_; }

  // Invariant 1; errc::not_found for a group the plan lacks, errc::invalid_argument when w needs
  // more than the group's bytes or the group already holds a set.
  void rehome(const std::string& group, model_weights& w);
  // The group's allocation; nullptr before rehome.
  const runtime::tier_allocation* allocation(const std::string& group) const;

 private:
  struct block;
  placement_plan plan_;
  std::vector<runtime::memory_tier> tiers_;
  std::vector<std::pair<std::string, std::shared_ptr<block>>> blocks_;
};

}  // namespace troupe::parallel::cxl
