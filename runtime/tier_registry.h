// runtime/tier_registry.h — which host memory ranges live (partly) on an emulated CXL tier,
// and what an access to them must cost. Owners of tier memory (parallel/cxl/tiered_state.h,
// the MEMO host buffers) register their ranges; code that streams through memory (the CPU
// AdamW, the swap engine's copies, `troupe membench`) asks how long an access must at least
// take and waits out the rest (the emulation of memory_tiers.h invariant 3, "through blocking").
//
//   register_tier_range(a.ptr, a.bytes, {.cxl_fraction = 0.64, .gbps = 20, .latency_ns = 250});
//   const auto t0 = std::chrono::steady_clock::now();
//   ... touch [p, p + n) ...
//   emulate_access(t0, emulated_seconds(p, n));   // sleeps until t0 + that, if still early
//   unregister_tier_range(a.ptr);
//
// Invariants:
//   1. Ranges do not overlap; registering one that overlaps a registered range throws
//      errc::invalid_argument naming both. Lookups are thread-safe (a shared mutex).
//   2. emulated_seconds(p, n) = cxl_fraction * n / (gbps * 1e9) + latency_ns * 1e-9 for the
//      range holding p (gbps = 0: no bandwidth term); 0 when p is in no range, or the range
//      has cxl_fraction 0. It never reads the memory.
//   3. Only emulated tiers register (a real CXL node costs what it costs); every figure
//      measured under emulation must be labelled emulated by whoever prints it.
#pragma once
#include <chrono>
#include <cstddef>

namespace troupe::runtime {

struct tier_access {
  double cxl_fraction = 0;  // share of the range's bytes on the emulated tier, [0, 1]
  double gbps = 0;          // the emulated tier's bandwidth cap (1e9 bytes/s); 0 = none
  double latency_ns = 0;    // added once per access
};

void register_tier_range(const void* p, size_t bytes, tier_access a);
void unregister_tier_range(const void* p);  // no-op when p starts no range
// The access of the range holding p; all zero when none.
tier_access tier_access_of(const void* p);
// Invariant 2.
double emulated_seconds(const void* p, size_t bytes);
// Sleeps until t0 + seconds when that is still ahead (no-op for seconds <= 0).
void emulate_access(std::chrono::steady_clock::time_point t0, double seconds);

}  // namespace troupe::runtime
