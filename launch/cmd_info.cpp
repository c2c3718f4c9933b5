// `troupe info`: build features, devices, NUMA nodes, host memory tiers and threads.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <string>
#include <vector>

#include "launch/commands.h"
#include "launch/rank_env.h"
#include "runtime/device.h"
#include "runtime/memory_tiers.h"
#include "runtime/threads.h"

#ifdef TROUPE_HAVE_NUMA
#include <numa.h>
#endif

namespace troupe::launch {

namespace {
std::string feature_line() {
  std::vector<std::pair<const char*, bool>> f = {
      {"OpenBLAS", true}, {"OpenMP", true},
#ifdef TROUPE_FEATURE_CUDA
      {"CUDA", true},
#else
      {"CUDA", false},
#endif
#ifdef TROUPE_FEATURE_NCCL
      {"NCCL", true},
#else
      {"NCCL", false},
#endif
#ifdef TROUPE_FEATURE_MPI
      {"MPI", true},
#else
      {"MPI", false},
#endif
#ifdef TROUPE_FEATURE_UCX
      {"UCX", true},
#else
      {"UCX", false},
#endif
#ifdef TROUPE_FEATURE_CBC
      {"CBC", true},
#else
      {"CBC", false},
#endif
#ifdef TROUPE_FEATURE_CAF
      {"CAF", true},
#else
      {"CAF", false},
#endif
#ifdef TROUPE_FEATURE_PROTOBUF
      {"Protobuf", true},
#else
      {"Protobuf", false},
#endif
#ifdef TROUPE_FEATURE_HWLOC
      {"hwloc", true},
#else
      {"hwloc", false},
#endif
#ifdef TROUPE_FEATURE_NUMA
      {"libnuma", true},
#else
      {"libnuma", false},
#endif
  };
  std::string s;
  for (auto& [name, on] : f) s += fmt::format("{}{} {}", s.empty() ? "" : "  ", name, on ? "✓" : "✗");
  return s;
}
}  // namespace

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Build features, devices, NUMA nodes and threads");
  cmd->callback([] {
    using namespace troupe::runtime;
    fmt::print("troupe {}\n", TROUPE_VERSION);
    fmt::print("features: {}\n", feature_line());
    fmt::print("threads:  {} (hardware {}; set TROUPE_NUM_THREADS to change)\n", num_threads(), hardware_threads());
    const rank_info r = discover_rank();
    fmt::print("rank:     {} of {} (local {} of {}; from {}){}\n", r.rank, r.world_size, r.local_rank,
               r.local_world_size, r.source,
               r.has_supervisor() ? fmt::format(", supervisor {}:{}", r.supervisor_host, r.supervisor_port) : "");
    cuda_state cs = cuda_status();
    fmt::print("cuda:     {}\n", cs.available ? fmt::format("{} device(s)", cs.device_count)
                                               : fmt::format("not usable ({})", cs.reason));
    fmt::print("devices:\n");
    for (const auto& d : list_devices())
      fmt::print("  {:<8} {:<32} {:.1f} GiB total, {:.1f} GiB free\n", d.dev.str(), d.name,
                 static_cast<double>(d.total_memory) / (1 << 30), static_cast<double>(d.free_memory) / (1 << 30));
#ifdef TROUPE_HAVE_NUMA
    if (numa_available() >= 0) {
      int maxn = numa_max_node();
      fmt::print("numa nodes: {}\n", maxn + 1);
      for (int n = 0; n <= maxn; ++n) {
        long long free_b = 0;
        long long size = numa_node_size64(n, &free_b);
        struct bitmask* cpus = numa_allocate_cpumask();
        int ncpu = 0;
        if (numa_node_to_cpus(n, cpus) == 0)
          for (unsigned i = 0; i < cpus->size; ++i) ncpu += numa_bitmask_isbitset(cpus, i) ? 1 : 0;
        numa_free_cpumask(cpus);
        fmt::print("  node {}: {:.1f} GiB, {:.1f} GiB free, {} cpus{}\n", n, static_cast<double>(size) / (1 << 30),
                   static_cast<double>(free_b) / (1 << 30), ncpu, ncpu == 0 ? " (cpu-less: CXL candidate)" : "");
      }
    } else {
      fmt::print("numa nodes: libnuma reports NUMA unavailable\n");
    }
#else
    fmt::print("numa nodes: not built with libnuma\n");
#endif
    // Host memory tiers (runtime/memory_tiers.h), each measured on 16 MiB buffers (~0.1 s).
    fmt::print("memory tiers:\n");
    for (const auto& t : discover_tiers()) {
      const tier_measurement m = measure_tier(t, size_t{16} << 20);
      fmt::print("  {:<6} {:<4} nodes {{{}}}  {:.1f} GiB  copy {:.1f} GB/s{}  latency {:.0f} ns{}{}\n", t.name,
                 tier_kind_name(t.type), fmt::join(t.numa_nodes, ","),
                 static_cast<double>(t.capacity_bytes) / (1 << 30), m.copy_gbps, emulated_label(m.emulated),
                 m.latency_ns, emulated_label(m.emulated),
                 m.placement_fell_back ? "  (buffers not placed on the tier: see the warning)" : "");
    }
  });
}

}  // namespace troupe::launch
