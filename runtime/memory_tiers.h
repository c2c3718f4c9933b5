// runtime/memory_tiers.h — host memory tiers: local DRAM and CXL (ALGORITHMS.md "CXL-aware
// host allocation"), discovered from the NUMA topology or declared in the job spec
// (memory.tiers, runtime/job_spec.h tiers_from_spec), and measured.
//
//   for (const memory_tier& t : discover_tiers())
//     fmt::print("{} {} GiB\n", t.name, t.capacity_bytes >> 30);
//   tier_measurement m = measure_tier(tiers[0], 32 << 20);   // copy GB/s, pointer-chase ns
//   fmt::print("{:.1f} GB/s{}\n", m.copy_gbps, m.emulated ? " (emulated)" : "");
//
// Invariants:
//   1. discover_tiers returns one tier per kind, never an empty one: "dram" holds every NUMA
//      node with CPUs and memory, "cxl" (only when there is one) every CPU-less node with
//      memory — the CXL candidates. One tier per kind, not per node, because placement
//      stripes a CXL group over all CXL nodes and fills local DRAM as one budget; the nodes
//      are listed in numa_nodes. Capacity is the nodes' total (numa_node_size64).
//   2. Without libnuma, or where the kernel reports NUMA unavailable, it returns one DRAM tier
//      "dram" on node 0 holding the machine's physical memory.
//   3. A tier is emulated when it is a CXL tier that lives on nodes with CPUs (DRAM standing in
//      for CXL) or carries an emulated bandwidth cap or latency. measure_tier applies the
//      emulation (copy rate capped at emulated_gbps, emulated_latency_ns added to the access
//      latency), keeps the raw figures next to them, and sets emulated: every emulated figure
//      is labelled as such wherever it is printed.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tier_alloc.h"

namespace troupe::runtime {

struct memory_tier {
  enum kind { dram, cxl };
  std::string name;
  kind type = dram;
  std::vector<int> numa_nodes;
  int64_t capacity_bytes = 0;
  bool emulated = false;
  double emulated_gbps = 0;        // 0 = no cap
  double emulated_latency_ns = 0;  // 0 = none
};

const char* tier_kind_name(memory_tier::kind k);

// A NUMA node of this machine: its memory and whether it has CPUs.
struct numa_node_info {
  int node = 0;
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
  int cpus = 0;
};
// The nodes that have memory (invariant 2: one node 0 with the physical memory without NUMA).
std::vector<numa_node_info> numa_nodes_with_memory();

std::vector<memory_tier> discover_tiers();
// The tiers of a given node list (invariant 1); discover_tiers() is tiers_of_nodes(numa_nodes_with_memory()).
std::vector<memory_tier> tiers_of_nodes(const std::vector<numa_node_info>& nodes);

// How a tier's memory is placed: bound to its node, or page-interleaved over its nodes.
placement placement_of(const memory_tier& t);

struct tier_measurement {
  size_t bytes = 0;           // buffer size per measurement
  double copy_gbps = 0;       // memcpy within the tier, best of a few, emulation applied
  double latency_ns = 0;      // dependent loads over a random cycle, emulation applied
  double raw_copy_gbps = 0;   // as measured on the underlying nodes
  double raw_latency_ns = 0;
  bool emulated = false;
  bool placement_fell_back = false;  // tier_alloc could not place the buffers on the tier
};

// Measures copy bandwidth and read latency on buffers of `bytes` placed on the tier
// (tier_alloc). Takes ~3 copies and ~bytes/64 dependent loads (capped at 2M): 32 MiB is
// about 0.1 s on a server.
tier_measurement measure_tier(const memory_tier& t, size_t bytes);

// "emulated" / "" for printing next to a figure.
inline const char* emulated_label(bool emulated) { return emulated ? " (emulated)" : ""; }

}  // namespace troupe::runtime
