// runtime/tier_registry.cpp — see tier_registry.h.
#include "runtime/tier_registry.h"

#include <cmath>
#include <iterator>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "runtime/error.h"

namespace troupe::runtime {

namespace {

struct range {
  size_t bytes;
  tier_access access;
};

std::shared_mutex mu;
std::map<const char*, range>& ranges() {
  static std::map<const char*, range> r;  // start -> range
  return r;
}

// The range holding p, or end().
std::map<const char*, range>::const_iterator find(const char* p) {
  auto& r = ranges();
  auto it = r.upper_bound(p);
  if (it == r.begin()) return r.end();
  --it;
  return p < it->first + it->second.bytes ? it : r.end();
}

}  // namespace

void register_tier_range(const void* p, size_t bytes, tier_access a) {
  TROUPE_CHECK(p != nullptr && bytes > 0, errc::invalid_argument, "tier registry: empty range at {}", p);
  TROUPE_CHECK(a.cxl_fraction >= 0 && a.cxl_fraction <= 1 && a.gbps >= 0 && a.latency_ns >= 0 &&
                   std::isfinite(a.gbps) && std::isfinite(a.latency_ns),
               errc::invalid_argument, "tier registry: cxl_fraction {} must be in [0, 1], gbps {} and latency {} >= 0",
               a.cxl_fraction, a.gbps, a.latency_ns);
  const char* s = static_cast<const char*>(p);
  std::unique_lock<std::shared_mutex> l(mu);
  auto& r = ranges();
  auto next = r.lower_bound(s);
  TROUPE_CHECK(next == r.end() || s + bytes <= next->first, errc::invalid_argument,
               "tier registry: range [{}, +{}) overlaps the registered range at {}", p, bytes,
               static_cast<const void*>(next->first));
  if (next != r.begin()) {
    auto prev = std::prev(next);
    TROUPE_CHECK(prev->first + prev->second.bytes <= s, errc::invalid_argument,
                 "tier registry: range [{}, +{}) overlaps the registered range [{}, +{})", p, bytes,
                 static_cast<const void*>(prev->first), prev->second.bytes);
  }
  r.emplace(s, range{bytes, a});
}

void unregister_tier_range(const void* p) {
  std::unique_lock<std::shared_mutex> l(mu);
  ranges().erase(static_cast<const char*>(p));
}

tier_access tier_access_of(const void* p) {
  std::shared_lock<std::shared_mutex> l(mu);
  auto it = find(static_cast<const char*>(p));
  return it == ranges().end() ? tier_access{} : it->second.access;
}

double emulated_seconds(const void* p, size_t bytes) {
  const tier_access a = tier_access_of(p);
  if (a.cxl_fraction <= 0) return 0;
  const double bw = a.gbps > 0 ? a.cxl_fraction * static_cast<double>(bytes) / (a.gbps * 1e9) : 0.0;
  return bw + a.latency_ns * 1e-9;
}

void emulate_access(std::chrono::steady_clock::time_point t0, double seconds) {
  if (!(seconds > 0)) return;
  std::this_thread::sleep_until(
      t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds)));
}

}  // namespace troupe::runtime
