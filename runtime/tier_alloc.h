// runtime/tier_alloc.h — host memory placed on NUMA nodes: mmap + mbind (MPOL_BIND or
// MPOL_INTERLEAVE over a node mask), pages touched after the policy is set, so every page
// lands where the policy says. The allocator behind the memory tiers (memory_tiers.h) and the
// CXL placement plan (parallel/cxl/placement.h).
//
//   tier_allocation a = tier_alloc(1 << 30, {{0}, placement::bind});   // 1 GiB on node 0
//   if (a.fell_back) log::info("{}", a.note);                            // warned once already
//   assert(policy_of(a.ptr) == MPOL_BIND && pages_nodes(a.ptr, a.bytes)[0] == 0);
//   tier_free(a);
//   tier_alloc(n, {{0, 1}, placement::interleave, {1, 3}});  // weighted: 1/4 on 0, 3/4 on 1
//
// Invariants:
//   1. The decision comes before any page is touched (plan_tier_alloc): a node whose free
//      memory (numa_node_size64) cannot hold its share is never bound. Fallback order: the
//      requested bind -> interleave over the given nodes (when together they have room) ->
//      the default policy. A failing mbind (EINVAL, EPERM in a container) falls back the same
//      way. Every fallback logs one warning naming the nodes and sizes and is reported in
//      tier_allocation (fell_back, policy, note).
//   2. interleave with empty or equal weights is MPOL_INTERLEAVE (page round robin); unequal
//      weights stripe the range in kStripeBytes chunks, each chunk MPOL_BIND to one node, in a
//      smooth weighted round robin (interleave_stripes), so node i gets weights[i]/sum of it.
//   3. Memory is page aligned, zero filled, and returned to the OS by tier_free (munmap).
//   4. Without libnuma (TROUPE_HAVE_NUMA unset) or where NUMA is unavailable, tier_alloc is a
//      plain page-aligned allocation with policy "default" (fell_back = false when nothing
//      but the default was asked for), policy_of returns 0 (MPOL_DEFAULT) and pages_nodes
//      throws errc::unsupported.
//   5. placement::pin: after the pages are placed and touched, the range is registered with
//      cudaHostRegister when this build has CUDA and a GPU answers (pinned: the GPU's copies
//      run at full speed and asynchronously); a failing registration is a warning and
//      pinned = false. Without CUDA, pin does nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace troupe::runtime {

struct placement {
  enum mode { bind, interleave };
  placement() = default;
  placement(std::vector<int> nodes_, mode how_ = bind, std::vector<int64_t> weights_ = {})
      : nodes(std::move(nodes_)), how(how_), weights(std::move(weights_)) {}
  std::vector<int> nodes;        // empty = no placement (default policy)
  mode how = bind;
  std::vector<int64_t> weights;  // interleave only: one per node, empty = uniform
  bool pin = false;              // GPUs copy from it: cudaHostRegister when CUDA is usable (invariant 5)
};

// What tier_alloc did. policy is "bind", "interleave", "striped" or "default".
struct tier_allocation {
  void* ptr = nullptr;
  size_t bytes = 0;      // as requested
  size_t mapped = 0;     // rounded up to whole pages
  std::string policy;
  std::vector<int> nodes;  // the nodes the applied policy names (empty for default)
  bool fell_back = false;
  std::string note;      // why it fell back; "" otherwise
  bool pinned = false;   // registered with cudaHostRegister (tier_free unregisters it)
};

// The decision tier_alloc would take, without allocating: policy and nodes after the
// free-memory checks (invariant 1). free_bytes(node) defaults to numa_node_size64's free.
struct tier_alloc_decision {
  std::string policy;
  std::vector<int> nodes;
  std::vector<int64_t> weights;
  bool fell_back = false;
  std::string note;
};
using node_free_fn = std::function<int64_t(int node)>;
tier_alloc_decision plan_tier_alloc(size_t bytes, const placement& where, const node_free_fn& free_bytes = {});

// Allocates `bytes` (0 allowed: one page) with the placement; throws errc::io when mmap fails.
tier_allocation tier_alloc(size_t bytes, const placement& where, const node_free_fn& free_bytes = {});
void tier_free(tier_allocation& a);

// The node each page of [p, p + bytes) lives on (move_pages, query mode); -1 for a page not
// yet present. For tests and `troupe info`.
std::vector<int> pages_nodes(const void* p, size_t bytes);
// The policy of the page at p (get_mempolicy with MPOL_F_ADDR): MPOL_DEFAULT 0, MPOL_BIND 2,
// MPOL_INTERLEAVE 3, ...
int policy_of(const void* p);

// Weighted striping (invariant 2): the node index (into weights) of each of n stripes.
std::vector<int> interleave_stripes(size_t n, const std::vector<int64_t>& weights);
inline constexpr size_t kStripeBytes = size_t{1} << 20;

// True when libnuma is built in and the kernel reports NUMA (numa_available() >= 0).
bool numa_usable();

}  // namespace troupe::runtime
