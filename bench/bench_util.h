// bench/bench_util.h — the small helpers every benchmark here prints with: wall time since a
// point, the median of repeated timings, MiB, and the 1-minute load average (other processes
// compete for the cores, so it is quoted next to the timings).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace troupe::bench {

using clk = std::chrono::steady_clock;

inline double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

// The median (mean of the middle two for an even count); 0 for none.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double mib(int64_t b) { return static_cast<double>(b) / (1 << 20); }

inline std::string loadavg() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return "?";
  char buf[64] = {};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  std::string s(buf, n);
  return s.substr(0, s.find(' '));
}

}  // namespace troupe::bench
