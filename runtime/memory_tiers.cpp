// runtime/memory_tiers.cpp — tier discovery from libnuma and the copy/latency measurement
// (memory_tiers.h).
#include "runtime/memory_tiers.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <random>

#include "runtime/error.h"

#ifdef TROUPE_HAVE_NUMA
#include <numa.h>
#endif

namespace troupe::runtime {

const char* tier_kind_name(memory_tier::kind k) { return k == memory_tier::cxl ? "cxl" : "dram"; }

std::vector<numa_node_info> numa_nodes_with_memory() {
  std::vector<numa_node_info> out;
#ifdef TROUPE_HAVE_NUMA
  if (numa_usable()) {
    const int maxn = numa_max_node();
    struct bitmask* cpus = numa_allocate_cpumask();
    for (int n = 0; n <= maxn; ++n) {
      long long fr = 0;
      const long long size = numa_node_size64(n, &fr);
      if (size <= 0) continue;  // no such node, or a node without memory
      numa_node_info info{n, static_cast<int64_t>(size), static_cast<int64_t>(fr), 0};
      if (numa_node_to_cpus(n, cpus) == 0)
        for (unsigned i = 0; i < cpus->size; ++i) info.cpus += numa_bitmask_isbitset(cpus, i) ? 1 : 0;
      out.push_back(info);
    }
    numa_free_cpumask(cpus);
    if (!out.empty()) return out;
  }
#endif
  const int64_t pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES), ps = sysconf(_SC_PAGESIZE);
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  out.push_back({0, pages * ps, avail * ps, static_cast<int>(std::max(cpus, 1L))});
  return out;
}

std::vector<memory_tier> discover_tiers() { return tiers_of_nodes(numa_nodes_with_memory()); }

std::vector<memory_tier> tiers_of_nodes(const std::vector<numa_node_info>& nodes) {
  memory_tier d{"dram", memory_tier::dram, {}, 0, false, 0, 0};
  memory_tier c{"cxl", memory_tier::cxl, {}, 0, false, 0, 0};
  for (const auto& n : nodes) {
    memory_tier& t = n.cpus > 0 ? d : c;
    t.numa_nodes.push_back(n.node);
    t.capacity_bytes += n.total_bytes;
  }
  std::vector<memory_tier> out;
  if (!d.numa_nodes.empty()) out.push_back(d);
  if (!c.numa_nodes.empty()) out.push_back(c);
  return out;
}

placement placement_of(const memory_tier& t) {
  placement p;
  p.nodes = t.numa_nodes;
  std::sort(p.nodes.begin(), p.nodes.end());
  p.nodes.erase(std::unique(p.nodes.begin(), p.nodes.end()), p.nodes.end());
  p.how = p.nodes.size() > 1 ? placement::interleave : placement::bind;
  return p;
}

tier_measurement measure_tier(const memory_tier& t, size_t bytes) {
  using clock = std::chrono::steady_clock;
  TROUPE_CHECK(bytes >= 4096, errc::invalid_argument, "measure_tier {}: {} bytes is too small (>= 4096)", t.name,
               bytes);
  tier_measurement m;
  m.bytes = bytes;
  const placement where = placement_of(t);
  tier_allocation src = tier_alloc(bytes, where);
  tier_allocation dst = tier_alloc(bytes, where);
  m.placement_fell_back = src.fell_back || dst.fell_back;

  std::memset(src.ptr, 1, bytes);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = clock::now();
    std::memcpy(dst.ptr, src.ptr, bytes);
    best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count());
  }
  m.raw_copy_gbps = static_cast<double>(bytes) / std::max(best, 1e-9) / 1e9;

  // Pointer chase: one 64-byte line per slot, linked in the order of a random permutation: one cycle through every slot.
  constexpr size_t line = 64;
  const size_t slots = bytes / line;
  auto* base = static_cast<char*>(src.ptr);
  std::vector<uint32_t> order(slots);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937 rng(12345);
  for (size_t i = slots - 1; i > 0; --i) std::swap(order[i], order[std::uniform_int_distribution<size_t>(0, i - 1)(rng)]);
  for (size_t i = 0; i < slots; ++i) {
    const uint64_t next = order[(i + 1) % slots];
    std::memcpy(base + static_cast<size_t>(order[i]) * line, &next, sizeof(next));
  }
  const size_t steps = std::min<size_t>(std::max<size_t>(slots, 1u << 16), size_t{1} << 21);
  uint64_t at = order[0];
  const auto t0 = clock::now();
  for (size_t s = 0; s < steps; ++s) at = *reinterpret_cast<const volatile uint64_t*>(base + at * line);
  const double chase_s = std::chrono::duration<double>(clock::now() - t0).count();
  m.raw_latency_ns = chase_s * 1e9 / static_cast<double>(steps);
  if (at >= slots) m.raw_latency_ns = -1;  // never: keeps the chase from being optimised away
  tier_free(src);
  tier_free(dst);

  m.emulated = t.emulated || t.emulated_gbps > 0 || t.emulated_latency_ns > 0;
  m.copy_gbps = t.emulated_gbps > 0 ? std::min(m.raw_copy_gbps, t.emulated_gbps) : m.raw_copy_gbps;
  m.latency_ns = m.raw_latency_ns + t.emulated_latency_ns;
  return m;
}

}  // namespace troupe::runtime
