// `troupe membench [JOB.yaml] [--sizes 1M,4M] [--quick] [--json]`: the host memory tiers measured
// the way the training job uses them (ALGORITHMS.md "CXL-aware host allocation"): copy bandwidth
// within each tier and between each pair (src -> dst), and the CPU AdamW step time per tier at
// several sizes (param, grad, m, v all on that tier).
//
//   troupe membench                                  # the discovered tiers
//   troupe membench examples/.../cxl.yaml --quick    # the job's memory.tiers (emulated CXL), ~s
//   troupe membench --sizes 1M,16M --json
//
// Invariants:
//   1. Tiers: a job spec's memory.tiers (runtime::tiers_from_spec) when JOB is given, else
//      runtime::discover_tiers(). Buffers are placed with tier_alloc(placement_of(tier)); a
//      placement that fell back is reported next to the figure.
//   2. An emulated tier with a bandwidth cap or latency registers its buffers
//      (runtime/tier_registry.h, cxl_fraction 1); every access streams in blocks and waits out
//      the emulated time: copies in 1 MiB chunks (the larger of the source's and destination's
//      emulated time), AdamW in blocks of 2^18 elements (the sum over its four arrays), as
//      parallel::adamw::step does. Every figure that touches an emulated tier says "(emulated)".
//   3. Copies: memcpy on one thread, one warm-up pass, median of 3 passes. AdamW: the OpenMP
//      kernel (runtime::num_threads() threads), one warm-up step, median of 3 steps.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "launch/commands.h"
#include "parallel/train/optimizer.h"
#include "runtime/error.h"
#include "runtime/job_spec.h"
#include "runtime/memory_tiers.h"
#include "runtime/threads.h"
#include "runtime/tier_alloc.h"
#include "runtime/tier_registry.h"

namespace troupe::launch {

namespace {

using runtime::errc;
using clk = std::chrono::steady_clock;

struct membench_args {
  std::string job;
  std::vector<std::string> sizes;
  bool quick = false;
  bool json = false;
  int64_t copy_mib = 0;  // 0: 64, --quick 16
};

constexpr size_t kCopyChunk = size_t{1} << 20;
constexpr int kReps = 3;

double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// "1M" -> 2^20, "64M", "512K", "1G", "1000" (elements).
int64_t parse_count(const std::string& s) {
  TROUPE_CHECK(!s.empty(), errc::invalid_argument, "membench --sizes: empty size (give e.g. 1M,4M)");
  int64_t mult = 1;
  std::string digits = s;
  switch (s.back()) {
    case 'K': case 'k': mult = int64_t{1} << 10; digits.pop_back(); break;
    case 'M': case 'm': mult = int64_t{1} << 20; digits.pop_back(); break;
    case 'G': case 'g': mult = int64_t{1} << 30; digits.pop_back(); break;
    default: break;
  }
  size_t used = 0;
  int64_t n = 0;
  try {
    n = std::stoll(digits, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TROUPE_CHECK(used == digits.size() && !digits.empty() && n > 0, errc::invalid_argument,
               "membench --sizes: '{}' is not a positive element count (e.g. 1M, 4M, 1000000)", s);
  return n * mult;
}

// The emulation a tier's buffers register under (invariant 2); nullopt-like: cxl_fraction 0.
runtime::tier_access access_of(const runtime::memory_tier& t) {
  if (!t.emulated || (t.emulated_gbps <= 0 && t.emulated_latency_ns <= 0)) return {};
  return {.cxl_fraction = 1.0, .gbps = t.emulated_gbps, .latency_ns = t.emulated_latency_ns};
}

// A buffer on a tier, registered with the tier's emulation while it lives.
class tier_buffer {
 public:
  tier_buffer(const runtime::memory_tier& t, size_t bytes) : a_(runtime::tier_alloc(bytes, runtime::placement_of(t))) {
    const runtime::tier_access acc = access_of(t);
    if (acc.cxl_fraction > 0) {
      runtime::register_tier_range(a_.ptr, a_.bytes, acc);
      registered_ = true;
    }
  }
  ~tier_buffer() {
    if (registered_) runtime::unregister_tier_range(a_.ptr);
    runtime::tier_free(a_);
  }
  tier_buffer(const tier_buffer&) = delete;
  tier_buffer& operator=(const tier_buffer&) = delete;
  char* bytes() const { return static_cast<char*>(a_.ptr); }
  float* floats() const { return static_cast<float*>(a_.ptr); }
  bool fell_back() const { return a_.fell_back; }

 private:
  runtime::tier_allocation a_;
  bool registered_ = false;
};

// One pass of `bytes` from src to dst in 1 MiB chunks, each waiting out its emulated time.
void copy_pass(const tier_buffer& src, const tier_buffer& dst, size_t bytes) {
  for (size_t off = 0; off < bytes; off += kCopyChunk) {
    const size_t len = std::min(kCopyChunk, bytes - off);
    const auto t0 = clk::now();
    std::memcpy(dst.bytes() + off, src.bytes() + off, len);
    runtime::emulate_access(t0, std::max(runtime::emulated_seconds(src.bytes() + off, len),
                                         runtime::emulated_seconds(dst.bytes() + off, len)));
  }
}

// One AdamW step over n elements, as parallel::adamw::step runs it.
void adamw_pass(float* w, const float* g, float* m, float* v, int64_t n, int64_t step) {
  const kernels::adamw_params hp{.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  parallel::tier_wait wait;
  parallel::adamw_update_on_tiers(w, g, m, v, n, hp, step, wait);
}

std::string describe_tier(const runtime::memory_tier& t) {
  std::string s = fmt::format("{:<10} {:<4}  nodes {:<6} {:>8.1f} GiB", t.name, runtime::tier_kind_name(t.type),
                              fmt::format("{}", fmt::join(t.numa_nodes, ",")),
                              static_cast<double>(t.capacity_bytes) / (1 << 30));
  if (t.emulated) {
    s += "  emulated";
    if (t.emulated_gbps > 0) s += fmt::format(", cap {:g} GB/s", t.emulated_gbps);
    if (t.emulated_latency_ns > 0) s += fmt::format(", +{:g} ns", t.emulated_latency_ns);
  }
  return s;
}

void run_membench(const membench_args& a) {
  const auto t_start = clk::now();
  const std::vector<runtime::memory_tier> tiers =
      a.job.empty() ? runtime::discover_tiers() : runtime::tiers_from_spec(runtime::load_job_spec(a.job));
  TROUPE_CHECK(!tiers.empty(), errc::invalid_argument, "membench: no memory tiers{}",
               a.job.empty() ? "" : fmt::format(" in {}", a.job));
  std::vector<int64_t> sizes;
  for (const std::string& s : a.sizes) sizes.push_back(parse_count(s));
  if (sizes.empty())
    sizes = a.quick ? std::vector<int64_t>{1 << 20, 4 << 20}
                    : std::vector<int64_t>{1 << 20, 4 << 20, 16 << 20, 64 << 20};
  const int64_t copy_mib = a.copy_mib > 0 ? a.copy_mib : a.quick ? 16 : 64;
  TROUPE_CHECK(copy_mib <= (int64_t{1} << 14), errc::invalid_argument, "membench --copy-mib {}: at most 16384",
               copy_mib);
  const size_t copy_bytes = static_cast<size_t>(copy_mib) << 20;

  nlohmann::json out;
  out["source"] = a.job.empty() ? "discovered" : a.job;
  out["threads"] = runtime::num_threads();
  if (!a.json) {
    fmt::print("membench: {} tier(s) {}, {} threads\n", tiers.size(),
               a.job.empty() ? "discovered" : fmt::format("from {}", a.job), runtime::num_threads());
    for (const auto& t : tiers) fmt::print("  {}\n", describe_tier(t));
  }
  for (const auto& t : tiers)
    out["tiers"].push_back({{"name", t.name},
                            {"kind", runtime::tier_kind_name(t.type)},
                            {"numa_nodes", t.numa_nodes},
                            {"capacity_bytes", t.capacity_bytes},
                            {"emulated", t.emulated},
                            {"emulated_gbps", t.emulated_gbps},
                            {"emulated_latency_ns", t.emulated_latency_ns}});

  // Copy bandwidth within and between tiers.
  if (!a.json)
    fmt::print("\ncopy bandwidth (memcpy, 1 thread, {} MiB in 1 MiB chunks, median of {}):\n", copy_mib, kReps);
  out["copy"] = nlohmann::json::array();
  for (const auto& src : tiers)
    for (const auto& dst : tiers) {
      tier_buffer s(src, copy_bytes), d(dst, copy_bytes);
      std::memset(s.bytes(), 0x5a, copy_bytes);
      copy_pass(s, d, copy_bytes);  // warm-up
      std::vector<double> secs;
      for (int r = 0; r < kReps; ++r) {
        const auto t0 = clk::now();
        copy_pass(s, d, copy_bytes);
        secs.push_back(seconds_since(t0));
      }
      TROUPE_CHECK(d.bytes()[copy_bytes - 1] == 0x5a, errc::internal, "membench: copy {} -> {} lost bytes", src.name,
                   dst.name);
      const double gbps = static_cast<double>(copy_bytes) / median(secs) / 1e9;
      const bool emu = src.emulated || dst.emulated;
      const bool fell = s.fell_back() || d.fell_back();
      out["copy"].push_back({{"src", src.name}, {"dst", dst.name}, {"bytes", copy_bytes}, {"gbps", gbps},
                             {"emulated", emu}, {"placement_fell_back", fell}});
      if (!a.json)
        fmt::print("  {:>10} -> {:<10} {:8.2f} GB/s{}{}\n", src.name, dst.name, gbps, runtime::emulated_label(emu),
                   fell ? "  (buffers not placed on the tier: see the warning)" : "");
    }

  // AdamW step time per tier and size.
  if (!a.json)
    fmt::print("\nAdamW step (fp32 param/grad/m/v on the tier, {} threads, blocks of 2^18, median of {} after a "
               "warm-up):\n  {:<10} {:>12} {:>10} {:>14}\n",
               runtime::num_threads(), kReps, "tier", "elements", "ms", "Melem/s");
  out["adamw"] = nlohmann::json::array();
  for (const auto& t : tiers)
    for (const int64_t n : sizes) {
      const size_t bytes = static_cast<size_t>(n) * sizeof(float);
      tier_buffer w(t, bytes), g(t, bytes), m(t, bytes), v(t, bytes);
      for (int64_t i = 0; i < n; ++i) {
        w.floats()[i] = 0.5f;
        g.floats()[i] = 1e-3f * static_cast<float>(i % 17 - 8);
      }
      adamw_pass(w.floats(), g.floats(), m.floats(), v.floats(), n, 1);  // warm-up
      std::vector<double> secs;
      for (int r = 0; r < kReps; ++r) {
        const auto t0 = clk::now();
        adamw_pass(w.floats(), g.floats(), m.floats(), v.floats(), n, 2 + r);
        secs.push_back(seconds_since(t0));
      }
      const double s = median(secs);
      const bool fell = w.fell_back() || g.fell_back() || m.fell_back() || v.fell_back();
      out["adamw"].push_back({{"tier", t.name}, {"elements", n}, {"seconds", s},
                              {"elements_per_s", static_cast<double>(n) / s}, {"emulated", t.emulated},
                              {"placement_fell_back", fell}});
      if (!a.json)
        fmt::print("  {:<10} {:>12} {:10.2f} {:14.1f}{}{}\n", t.name, n, s * 1e3, static_cast<double>(n) / s / 1e6,
                   runtime::emulated_label(t.emulated), fell ? "  (buffers not placed on the tier)" : "");
    }
  out["seconds"] = seconds_since(t_start);
  if (a.json)
    fmt::print("{}\n", out.dump(2));
  else
    fmt::print("\n{:.1f} s\n", seconds_since(t_start));
}

}  // namespace

void register_membench(CLI::App& app) {
  auto args = std::make_shared<membench_args>();
  auto* cmd = app.add_subcommand(
      "membench", "Measure the host memory tiers: copy bandwidth per tier and between tiers, AdamW step time per tier");
  cmd->add_option("JOB", args->job, "Job spec whose memory.tiers to measure (default: the discovered tiers)");
  cmd->add_option("--sizes", args->sizes, "AdamW sizes in elements (default 1M,4M,16M,64M)")->delimiter(',');
  cmd->add_flag("--quick", args->quick, "AdamW at 1M,4M and 16 MiB copies (a few seconds)");
  cmd->add_option("--copy-mib", args->copy_mib, "Copy buffer size in MiB (default 64, --quick 16)");
  cmd->add_flag("--json", args->json, "Print the figures as JSON");
  cmd->callback([args] { run_membench(*args); });
}

}  // namespace troupe::launch
