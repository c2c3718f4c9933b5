// bench/cxl_bench.cpp — the CPU AdamW step on host memory placed by parallel/cxl/placement.h,
// under an emulated CXL tier: latency_first vs interleave_all vs cxl_only vs dram_only, each a
// ratio against dram_only measured in the same run (ALGORITHMS.md "CXL-aware host allocation",
// issue #6; the paper, arXiv 2507.03305, reports latency-first at 97-99% of DRAM-only and up to
// 21% better than interleave). Prints Markdown on stdout (progress on stderr).
//
//   build-bench/bench/cxl_bench --threads 1             # 48M parameters (~30 s on 2 cores)
//   build-bench/bench/cxl_bench --quick                 # smoke run (4M parameters, a few s)
//   build-bench/bench/cxl_bench --params-m 128 --cxl-gbps 8 --cxl-latency-ns 200 --reps 7 --cumulative
//
// Invariants:
//   1. The groups are training_groups(params, activations = 2 B/param): fp32 momentum, variance,
//      master grads and master weights (what the optimizer step touches), bf16 compute weights,
//      activations, compute grads. They are placed by place() on two tiers: the discovered DRAM
//      tier and a CXL tier declared on the same nodes (emulated: --cxl-gbps, --cxl-latency-ns).
//      The local DRAM budget (default: momentum + variance + master grads + half the master
//      weights) makes latency_first straddle the master weights, as in the paper's example.
//   2. Only the four fp32 groups are allocated (tier_alloc with the plan's placement) and
//      registered (runtime/tier_registry.h) with cxl_fraction = the group's CXL bytes / bytes.
//      The step is parallel::adamw_update_on_tiers (blocks of 2^18 elements): by default each
//      block waits out the sum of its four arrays' emulated time after its own start; with
//      --cumulative, as parallel::adamw::step does, until the step's start + the emulated time of
//      all blocks so far, so a late wake-up is not paid twice.
//   3. Emulation defaults model CXL against this machine's DRAM measured at the start: the cap is
//      half the DRAM AdamW stream rate (16 B per element over the dram_only step time), the added
//      latency 1.5x the DRAM load latency (CXL at ~2.5x DRAM). Every figure is "(emulated)".
//   4. Timing: one warm-up round, then --reps rounds, each running every policy once (round
//      robin, starting one policy later each round, so load from other processes and the
//      position in the round hit all alike); median per policy.
//   5. Before that, the cost of the blocking itself with nothing registered: parallel::adamw::step
//      against one unblocked adamw_update per parameter on a ~5M-parameter model (--overhead-reps).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/adamw.h"
#include "parallel/cxl/placement.h"
#include "parallel/model/model_weights.h"
#include "parallel/train/optimizer.h"
#include "runtime/memory_tiers.h"
#include "runtime/threads.h"
#include "runtime/tier_alloc.h"
#include "runtime/tier_registry.h"

using namespace troupe;
using parallel::cxl::placement_policy;
using clk = std::chrono::steady_clock;
using namespace troupe::bench;  // seconds_since, median, mib, loadavg

namespace {

constexpr int64_t kBlock = parallel::adamw_block;





struct bench_options {
  int64_t params_m = 48;  // millions of parameters (2^20)
  int64_t budget_mib = 0;  // 0: invariant 1
  double cxl_gbps = 0;     // 0: invariant 3
  double cxl_latency_ns = -1;
  int64_t reps = 5;
  int64_t threads = 0;
  int64_t overhead_reps = 15;
  bool quick = false;
  bool cumulative = false;
};

// One fp32 group allocated per the plan and registered with its CXL share.
class placed_group {
 public:
  placed_group(const parallel::cxl::group_placement& g, const runtime::tier_access& cxl)
      : a_(runtime::tier_alloc(static_cast<size_t>(g.bytes), g.where)),
        fraction_(g.bytes > 0 ? static_cast<double>(g.cxl_bytes) / static_cast<double>(g.bytes) : 0.0) {
    if (fraction_ > 0) {
      runtime::register_tier_range(a_.ptr, a_.bytes, {fraction_, cxl.gbps, cxl.latency_ns});
      registered_ = true;
    }
  }
  ~placed_group() {
    if (registered_) runtime::unregister_tier_range(a_.ptr);
    runtime::tier_free(a_);
  }
  placed_group(const placed_group&) = delete;
  placed_group& operator=(const placed_group&) = delete;
  float* data() const { return static_cast<float*>(a_.ptr); }
  double cxl_fraction() const { return fraction_; }
  const runtime::tier_allocation& alloc() const { return a_; }

 private:
  runtime::tier_allocation a_;
  double fraction_ = 0;
  bool registered_ = false;
};

// The four arrays of one policy's optimizer state.
struct policy_state {
  placement_policy policy;
  parallel::cxl::placement_plan plan;
  std::unique_ptr<placed_group> w, g, m, v;
  int64_t steps = 0;
  std::vector<double> secs;
};

// cumulative (what parallel::adamw::step does): each block waits until the step's start + the
// emulated time of every block so far, so an oversleep (a late wake-up on a loaded machine) is
// not paid twice; otherwise until the block's own start + its emulated time.
void adamw_step(policy_state& s, int64_t n, bool cumulative) {
  const kernels::adamw_params hp{.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  ++s.steps;
  parallel::tier_wait wait;
  wait.per_block = !cumulative;
  parallel::adamw_update_on_tiers(s.w->data(), s.g->data(), s.m->data(), s.v->data(), n, hp, s.steps, wait);
}

// What the emulation alone charges for one step (the floor under the measured time).
double emulated_floor(const policy_state& s, int64_t n) {
  double t = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const size_t bytes = static_cast<size_t>(std::min(kBlock, n - off)) * sizeof(float);
    t += runtime::emulated_seconds(s.w->data() + off, bytes) + runtime::emulated_seconds(s.g->data() + off, bytes) +
         runtime::emulated_seconds(s.m->data() + off, bytes) + runtime::emulated_seconds(s.v->data() + off, bytes);
  }
  return t;
}

// The cost of the blocking itself, nothing registered: parallel::adamw::step (blocks of 2^18, four
// registry lookups per block) against one unblocked adamw_update per parameter, on a ~5M-param
// model, the two interleaved; medians of `reps`.
void blocking_overhead(int64_t reps) {
  runtime::model_config c;
  c.vocab_size = 4096, c.hidden = 256, c.intermediate = 688, c.n_layers = 4, c.n_heads = 8, c.n_kv_heads = 4,
  c.head_dim = 32;
  parallel::model_weights wa = parallel::model_weights::random_init(c, 1);
  parallel::model_weights wb = parallel::model_weights::random_init(c, 1);
  const parallel::model_weights g = parallel::model_weights::random_init(c, 2);
  const parallel::adamw_config cfg{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  parallel::adamw opt(wa, cfg);
  parallel::model_weights m = parallel::model_weights::zeros_like(wb), v = parallel::model_weights::zeros_like(wb);
  std::vector<double> blocked, plain;
  for (int64_t r = 0; r <= reps; ++r) {  // r = 0 warms up
    auto t0 = clk::now();
    opt.step(wa, g, 1e-4);
    if (r > 0) blocked.push_back(seconds_since(t0));
    t0 = clk::now();
    auto pw = wb.parameters(), pm = m.parameters(), pv = v.parameters();
    const auto pg = g.parameters();
    for (size_t i = 0; i < pw.size(); ++i) {
      kernels::adamw_params hp{.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                               .weight_decay = pw[i].value.ndim() >= 2 ? 0.1f : 0.0f};
      kernels::cpu::adamw_update(pw[i].value.data<float>(), pg[i].second.data<float>(), pm[i].value.data<float>(),
                                 pv[i].value.data<float>(), pw[i].value.numel(), hp, r + 1);
    }
    if (r > 0) plain.push_back(seconds_since(t0));
  }
  const double b = median(blocked), p = median(plain);
  const double bmin = *std::min_element(blocked.begin(), blocked.end());
  const double pmin = *std::min_element(plain.begin(), plain.end());
  fmt::print("blocking overhead, nothing registered ({} params, {} rounds): parallel::adamw::step median {:.2f} ms "
             "(min {:.2f}), unblocked adamw_update median {:.2f} ms (min {:.2f}); ratio of medians {:.3f}, of mins "
             "{:.3f}\n\n",
             wa.parameter_count(), reps, b * 1e3, bmin * 1e3, p * 1e3, pmin * 1e3, b / p, bmin / pmin);
}

}  // namespace

int main(int argc, char** argv) {
  bench_options o;
  CLI::App app{"CPU AdamW step under an emulated CXL tier: latency_first vs interleave_all vs cxl_only vs dram_only"};
  app.add_flag("--quick", o.quick, "4M parameters, 3 reps (smoke run, a few seconds)");
  app.add_option("--params-m", o.params_m, "parameters in millions (2^20), fp32 master state");
  app.add_option("--budget-mib", o.budget_mib, "local DRAM budget (default: m + v + master grads + half the weights)");
  app.add_option("--cxl-gbps", o.cxl_gbps, "emulated CXL bandwidth cap, 1e9 B/s (default: half the DRAM rate)");
  app.add_option("--cxl-latency-ns", o.cxl_latency_ns, "emulated CXL added latency (default: 1.5x DRAM latency)");
  app.add_option("--reps", o.reps, "timed rounds (median)");
  app.add_flag("--cumulative", o.cumulative,
               "wait out the emulated time per step so far, not per block (absorbs late wake-ups)");
  app.add_option("--threads", o.threads, "0 = TROUPE_NUM_THREADS or all cores");
  app.add_option("--overhead-reps", o.overhead_reps, "rounds of the blocking-overhead check (0 = skip)");
  CLI11_PARSE(app, argc, argv);
  if (o.quick) o.params_m = 4, o.reps = 3, o.overhead_reps = 3;
  if (o.threads > 0) runtime::set_num_threads(static_cast<int>(o.threads));
  const auto t_start = clk::now();
  const int64_t n = o.params_m << 20;
  const int64_t state = n * 4;  // bytes of one fp32 group

  // The DRAM tier and its measured copy bandwidth and latency.
  std::vector<runtime::memory_tier> tiers;
  for (const auto& t : runtime::discover_tiers())
    if (t.type == runtime::memory_tier::dram) tiers.push_back(t);
  if (tiers.empty()) {
    fmt::print(stderr, "cxl_bench: no DRAM tier discovered\n");
    return 1;
  }
  const runtime::memory_tier& dram = tiers[0];
  const runtime::tier_measurement dm = runtime::measure_tier(dram, size_t{32} << 20);
  fmt::print("## cxl_bench: {} threads, load {}; {} params (fp32 state {:.0f} MiB per group){}\n",
             runtime::num_threads(), loadavg(), n, mib(state), o.quick ? " (--quick)" : "");
  fmt::print("DRAM tier '{}' nodes {}: copy {:.2f} GB/s (1 thread), load latency {:.1f} ns\n", dram.name,
             fmt::format("{}", fmt::join(dram.numa_nodes, ",")), dm.copy_gbps, dm.latency_ns);

  const auto groups = parallel::cxl::training_groups(n, 2 * n);
  const int64_t budget = o.budget_mib > 0 ? o.budget_mib << 20 : 3 * state + state / 2;
  const std::vector<placement_policy> policies = {placement_policy::dram_only, placement_policy::latency_first,
                                                   placement_policy::interleave_all, placement_policy::cxl_only};

  // Calibration (invariant 3): the dram_only step, before any CXL is declared.
  runtime::memory_tier cxl = dram;
  cxl.name = "cxl";
  cxl.type = runtime::memory_tier::cxl;
  cxl.emulated = true;
  std::vector<policy_state> states;
  auto build = [&](placement_policy p) {
    policy_state s;
    s.policy = p;
    std::vector<runtime::memory_tier> ts = tiers;
    ts.push_back(cxl);
    s.plan = parallel::cxl::place(groups, ts, budget, p);
    const runtime::tier_access acc{1.0, cxl.emulated_gbps, cxl.emulated_latency_ns};
    s.m = std::make_unique<placed_group>(s.plan["momentum"], acc);
    s.v = std::make_unique<placed_group>(s.plan["variance"], acc);
    s.g = std::make_unique<placed_group>(s.plan["master_grads"], acc);
    s.w = std::make_unique<placed_group>(s.plan["master_weights"], acc);
    for (int64_t i = 0; i < n; ++i) {
      s.w->data()[i] = 0.02f * static_cast<float>(i % 101 - 50) / 50.0f;
      s.g->data()[i] = 1e-3f * static_cast<float>(i % 17 - 8);
    }
    return s;
  };
  double cal_s = 0;
  {
    policy_state cal = build(placement_policy::dram_only);
    adamw_step(cal, n, o.cumulative);
    std::vector<double> t;
    for (int r = 0; r < 3; ++r) {
      const auto t0 = clk::now();
      adamw_step(cal, n, o.cumulative);
      t.push_back(seconds_since(t0));
    }
    cal_s = median(t);
  }
  const double dram_stream_gbps = 16.0 * static_cast<double>(n) / cal_s / 1e9;
  cxl.emulated_gbps = o.cxl_gbps > 0 ? o.cxl_gbps : dram_stream_gbps / 2;
  cxl.emulated_latency_ns = o.cxl_latency_ns >= 0 ? o.cxl_latency_ns : 1.5 * dm.latency_ns;
  fmt::print("DRAM AdamW stream (calibration, dram_only): {:.1f} ms per step = {:.2f} GB/s over param/grad/m/v\n",
             cal_s * 1e3, dram_stream_gbps);
  fmt::print("emulated CXL tier '{}' on nodes {}: cap {:.2f} GB/s{}, +{:.0f} ns per access{}\n", cxl.name,
             fmt::format("{}", fmt::join(cxl.numa_nodes, ",")), cxl.emulated_gbps,
             o.cxl_gbps > 0 ? "" : " (half the DRAM stream)", cxl.emulated_latency_ns,
             o.cxl_latency_ns >= 0 ? "" : " (1.5x DRAM latency)");
  fmt::print("local DRAM budget {:.0f} MiB ({:.2f} fp32 groups)\n\n", mib(budget),
             static_cast<double>(budget) / static_cast<double>(state));
  if (o.overhead_reps > 0) blocking_overhead(o.overhead_reps);

  for (placement_policy p : policies) states.push_back(build(p));
  fmt::print("| policy | momentum CXL | variance CXL | master grads CXL | master weights CXL | placement |\n"
             "|---|---:|---:|---:|---:|---|\n");
  for (const auto& s : states) {
    const auto pct = [](const placed_group& g) { return fmt::format("{:.0f}%", 100 * g.cxl_fraction()); };
    std::string how;
    for (const placed_group* g : {s.m.get(), s.v.get(), s.g.get(), s.w.get()})
      how += fmt::format("{}{}{}", how.empty() ? "" : ", ", g->alloc().policy,
                         g->alloc().fell_back ? " (fell back)" : "");
    fmt::print("| {} | {} | {} | {} | {} | {} |\n", parallel::cxl::policy_name(s.policy), pct(*s.m), pct(*s.v),
               pct(*s.g), pct(*s.w), how);
  }

  for (auto& s : states) adamw_step(s, n, o.cumulative);  // warm-up round
  for (int64_t r = 0; r < o.reps; ++r) {
    for (size_t k = 0; k < states.size(); ++k) {
      policy_state& s = states[(k + static_cast<size_t>(r)) % states.size()];  // each policy leads a round in turn
      const auto t0 = clk::now();
      adamw_step(s, n, o.cumulative);
      s.secs.push_back(seconds_since(t0));
    }
    fmt::print(stderr, "  round {}/{} done\n", r + 1, o.reps);
  }

  const double base = median(states[0].secs);
  fmt::print("\n### Optimizer step (AdamW, {} params, fp32), median of {}, waits per {} (emulated CXL)\n\n", n,
             o.reps, o.cumulative ? "step (cumulative)" : "block");
  fmt::print("| policy | step ms (emulated) | min ms | emulated floor ms | DRAM-only / policy | policy / DRAM-only |\n"
             "|---|---:|---:|---:|---:|---:|\n");
  double lf = 0, il = 0;
  for (const auto& s : states) {
    const double med = median(s.secs), mn = *std::min_element(s.secs.begin(), s.secs.end());
    if (s.policy == placement_policy::latency_first) lf = med;
    if (s.policy == placement_policy::interleave_all) il = med;
    fmt::print("| {} | {:.1f} | {:.1f} | {:.1f} | {:.1f}% | {:.3f} |\n", parallel::cxl::policy_name(s.policy),
               med * 1e3, mn * 1e3, emulated_floor(s, n) * 1e3, 100 * base / med, med / base);
  }
  fmt::print("\nlatency_first: {:.1f}% of DRAM-only throughput (paper: 97-99%); {:.1f}% faster than interleave_all "
             "(interleave / latency_first - 1; paper: up to 21%) (emulated)\n",
             100 * base / lf, 100 * (il / lf - 1));
  fmt::print("load {} after; total {:.1f} s\n", loadavg(), seconds_since(t_start));
  return 0;
}
