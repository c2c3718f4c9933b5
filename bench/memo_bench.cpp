// bench/memo_bench.cpp — MEMO (parallel/memo/) against its baselines, each figure a ratio against
// one measured in the same run: (a) the largest trainable seq_len under a device budget, (b) the
// training step time, (c) fragmentation of the planned arena vs a caching allocator, (d) planner
// solve time by model size. Prints Markdown tables on stdout (progress on stderr).
//
//   build-bench/bench/memo_bench                     # full run (~5 min on 2 cores)
//   build-bench/bench/memo_bench --quick             # smoke run (tiny model, < 30 s)
//   build-bench/bench/memo_bench --budget-mib 256 --step-seq 1024 --gbps 12 --reps 3 --threads 2
//   build-bench/bench/memo_bench --parts ab          # only parts a and b
//
// Invariants:
//   1. One dense Llama model built in code (default: vocab 258, hidden 256, 8 layers, 8 heads /
//      4 kv heads, intermediate 688, untied, random_init seed 7), micro batch 1, fp32.
//   2. (a) find_max_seq (multiples of 16) with memory_settings: no offload (planned arena), MEMO
//      α = 1, MEMO α auto (α chosen by plan_memory's measurement at the α = 1 answer, then
//      find_max_seq again at that α), full recompute; and the caching allocator: the no-offload
//      trace extrapolated from record_trace at 16 and 32 tokens, replayed through
//      replay_caching_allocator, the largest T with 16·params + reserved_peak <= budget (the
//      answer is re-checked against a trace recorded at T). keep_last_layers = 2 everywhere.
//   3. (b) forward_backward only (no optimizer), the modes run round-robin, the same tokens for
//      every mode within a round, median over --reps rounds after one warm-up round. Baseline:
//      no offload on the heap. Every arena mode runs in a step_arena planned by plan_memory for
//      that mode at that T; fallbacks are reported. Losses are compared bitwise with the baseline.
//      Ratios: median / baseline median, and min / baseline min (the least disturbed by other
//      processes on a shared machine; the 1-minute load average is printed before and after).
//   4. (c) plan_memory (measure = false) per (T, mode): plan arena / max live and caching
//      allocator reserved / max live of the same trace.
//   5. (d) plan_memory (measure = false, memo off) at --plan-seq for several model sizes, CBC
//      limited to --planner-s seconds: events, method, arena vs max live (no plan can be lower).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "parallel/memo/arena.h"
#include "parallel/memo/caching_allocator_sim.h"
#include "parallel/memo/memory_plan.h"
#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_presets.h"
#include "parallel/model/model_weights.h"
#include "runtime/io/hf_config.h"
#include "runtime/threads.h"

using namespace troupe;
using namespace troupe::parallel::memo;
using clk = std::chrono::steady_clock;
using namespace troupe::bench;  // seconds_since, median, mib, loadavg

namespace {





runtime::model_config dense(int64_t hidden, int64_t layers, int64_t heads, int64_t kv, int64_t inter, int64_t vocab) {
  return runtime::parse_hf_config(
      fmt::format(R"({{"model_type": "llama", "vocab_size": {}, "hidden_size": {}, "intermediate_size": {},
          "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {},
          "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": false}})",
                  vocab, hidden, inter, layers, heads, kv),
      "memo_bench preset");
}

struct bench_options {
  int64_t hidden = 256, layers = 8, heads = 8, kv_heads = 4, inter = 688, vocab = 258;
  int64_t budget_mib = 256, t_max = 32768, step_seq = 1024, reps = 7, threads = 0, keep = 2;
  int64_t plan_seq = 256;
  double gbps = 12, planner_s = 5;
  std::vector<int64_t> frag_seqs = {512, 1024, 2048, 4096};
  std::string parts = "abcd";
  bool quick = false;
};

memory_settings settings(const bench_options& o, bool memo, double alpha, bool full) {
  memory_settings s;
  s.device_budget = o.budget_mib << 20;
  s.memo = memo;
  s.alpha = alpha;
  s.full_recompute = full;
  s.keep_last_layers = o.keep;
  s.copy_bandwidth_gbps = o.gbps;
  s.planner.time_limit_s = o.planner_s;
  return s;
}

// (a) The largest seq_len per mode under the budget.
void part_a(const bench_options& o, const parallel::model_weights& w) {
  const int64_t B = 1, budget = o.budget_mib << 20, persistent = 16 * w.parameter_count();
  fmt::print(stderr, "(a) largest seq_len under {} MiB\n", o.budget_mib);
  struct row {
    std::string mode;
    int64_t T = 0;
    double alpha = -1, s = 0;
    std::string note;
  };
  std::vector<row> rows;
  auto run = [&](const std::string& mode, memory_settings s, double shown_alpha) {
    const auto t0 = clk::now();
    const int64_t T = find_max_seq(w, B, s, o.t_max, 16);
    rows.push_back({mode, T, shown_alpha, seconds_since(t0), ""});
    fmt::print(stderr, "  {}: {} ({:.1f} s)\n", mode, T, rows.back().s);
    return T;
  };
  const int64_t t_off = run("no offload (planned arena)", settings(o, false, 0, false), -1);
  const int64_t t_a1 = run("MEMO alpha=1", settings(o, true, 1.0, false), 1.0);
  {  // α auto: measured at the α = 1 answer, then the search again at that α.
    const auto t0 = clk::now();
    memory_settings s = settings(o, true, -1, false);
    s.device_budget = 0;
    const memory_report r = plan_memory(w, B, std::max<int64_t>(t_a1, 16), s, /*measure=*/true);
    row x{"MEMO alpha auto", t_a1, r.alpha, 0, r.alpha_detail.reason};
    if (r.alpha < 1.0) x.T = find_max_seq(w, B, settings(o, true, r.alpha, false), o.t_max, 16);
    x.s = seconds_since(t0);
    fmt::print(stderr, "  MEMO alpha auto: alpha {:.4f} ({}): {}\n", r.alpha, r.alpha_detail.reason, x.T);
    rows.push_back(x);
  }
  run("full recompute", settings(o, false, 0, true), -1);
  if (o.keep != 0) {  // every layer swapped / checkpointed (Megatron's full recompute keeps none)
    memory_settings s = settings(o, true, 1.0, false);
    s.keep_last_layers = 0;
    run("MEMO alpha=1, keep_last_layers 0", s, 1.0);
    s = settings(o, false, 0, true);
    s.keep_last_layers = 0;
    run("full recompute, keep_last_layers 0", s, -1);
  }
  {  // The caching allocator: the no-offload trace, extrapolated, replayed.
    const auto t0 = clk::now();
    const memory_settings s = settings(o, false, 0, false);
    const recorded_step r16 = record_trace(w, B, 16, s), r32 = record_trace(w, B, 32, s);
    auto reserved = [&](int64_t T) {
      return replay_caching_allocator(extrapolate_step(r16, 16, r32, 32, T).trace.events()).reserved_peak;
    };
    int64_t lo = 0, hi = o.t_max / 16;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (persistent + reserved(mid * 16) <= budget)
        lo = mid;
      else
        hi = mid - 1;
    }
    const int64_t T = lo * 16;
    std::string note;
    if (T > 0) {  // the extrapolated trace against one recorded at T
      const int64_t rec = replay_caching_allocator(record_trace(w, B, T, s).trace.events()).reserved_peak;
      note = rec == reserved(T) ? "checked against a trace recorded at T"
                                : fmt::format("recorded trace at T reserves {} B, extrapolated {} B", rec, reserved(T));
    }
    rows.push_back({"no offload, caching allocator", T, -1, seconds_since(t0), note});
    fmt::print(stderr, "  caching allocator: {} ({})\n", T, note);
  }
  fmt::print("\n### (a) Largest seq_len per rank under a {} MiB device budget\n\n", o.budget_mib);
  fmt::print("persistent (16 B/param, {} params): {:.1f} MiB; micro batch 1; multiples of 16; keep_last_layers {}; "
             "t_max {}\n\n",
             w.parameter_count(), mib(persistent), o.keep, o.t_max);
  fmt::print("| mode | alpha | max seq_len | vs no offload | search s |\n|---|---:|---:|---:|---:|\n");
  for (const row& r : rows)
    fmt::print("| {} | {} | {} | {:.2f}x | {:.1f} |\n", r.mode, r.alpha >= 0 ? fmt::format("{:.4f}", r.alpha) : "-",
               r.T, t_off > 0 ? static_cast<double>(r.T) / static_cast<double>(t_off) : 0.0, r.s);
  for (const row& r : rows)
    if (!r.note.empty()) fmt::print("\n* {}: {}", r.mode, r.note);
  fmt::print("\n");
}

// (b) forward_backward time per mode at one seq_len.
void part_b(const bench_options& o, const parallel::model_weights& w) {
  const int64_t B = 1, T = o.step_seq;
  fmt::print(stderr, "(b) step time at T = {}\n", T);
  struct mode {
    std::string name;
    std::optional<memo_options> memo;
    bool arena = false;
    memory_settings plan_with;
    double alpha_used = -1;
    int64_t arena_bytes = 0;
    std::unique_ptr<step_arena> a;
    std::unique_ptr<memo_swap> swap;
    std::unique_ptr<parallel::decoder> dec;
    std::vector<double> t;
    bool loss_equal = true;
  };
  std::vector<mode> modes;
  auto add = [&](std::string name, bool arena, bool memo, double alpha, bool full, double gbps, int64_t keep = -1) {
    mode m;
    m.name = std::move(name);
    m.arena = arena;
    m.plan_with = settings(o, memo, alpha, full);
    m.plan_with.device_budget = 0;
    m.plan_with.copy_bandwidth_gbps = gbps;
    if (keep >= 0) m.plan_with.keep_last_layers = keep;
    if (memo || full) m.memo = memo_options{alpha, m.plan_with.keep_last_layers, gbps, full};
    m.alpha_used = alpha;
    modes.push_back(std::move(m));
  };
  add("no offload, heap (baseline)", false, false, 0, false, 0);
  add("no offload, planned arena", true, false, 0, false, 0);
  add(fmt::format("MEMO alpha auto, {} GB/s", o.gbps), true, true, -1, false, o.gbps);
  for (double a : {0.0, 0.5, 1.0}) add(fmt::format("MEMO alpha={}, {} GB/s", a, o.gbps), true, true, a, false, o.gbps);
  add("MEMO alpha auto, uncapped", true, true, -1, false, 0);
  for (double a : {0.0, 1.0}) add(fmt::format("MEMO alpha={}, uncapped", a), true, true, a, false, 0);
  add("full recompute, planned arena", true, false, 0, true, 0);
  add("full recompute, heap", false, false, 0, true, 0);
  if (o.keep != 0) {
    add(fmt::format("MEMO alpha=1, {} GB/s, keep_last_layers 0", o.gbps), true, true, 1.0, false, o.gbps, 0);
    add("full recompute, planned arena, keep_last_layers 0", true, false, 0, true, 0, 0);
  }
  for (mode& m : modes) {
    if (m.arena) {
      const bool measure = m.memo && !m.memo->full_recompute && m.alpha_used < 0;
      const memory_report r = plan_memory(w, B, T, m.plan_with, measure);
      if (m.memo && !m.memo->full_recompute) m.memo->alpha = r.alpha;
      m.alpha_used = r.alpha;
      m.arena_bytes = r.plan.arena_bytes;
      m.a = std::make_unique<step_arena>(r.plan);
      fmt::print(stderr, "  planned {}: alpha {:.4f}, arena {:.1f} MiB ({}, {:.1f} s)\n", m.name, r.alpha,
                 mib(r.plan.arena_bytes), r.plan.method, r.plan.solve_s);
    }
    if (m.memo) m.swap = std::make_unique<memo_swap>(*m.memo);
    m.dec = std::make_unique<parallel::decoder>(w);
  }
  parallel::model_weights g = parallel::model_weights::zeros_like(w);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(w.config().vocab_size - 1));
  std::vector<int32_t> ids(static_cast<size_t>(B * T)), tg(ids.size());
  const std::string load0 = loadavg();
  for (int64_t round = 0; round <= o.reps; ++round) {  // round 0: warm-up
    for (auto& x : ids) x = tok(rng);
    for (auto& x : tg) x = tok(rng);
    float ref = 0;
    for (size_t i = 0; i < modes.size(); ++i) {
      mode& m = modes[i];
      g.zero_();
      parallel::fb_options fo;
      fo.arena = m.a.get();
      fo.memo = m.swap.get();
      const auto t0 = clk::now();
      const float loss = m.dec->forward_backward(ids.data(), tg.data(), B, T, g, fo);
      const double dt = seconds_since(t0);
      if (i == 0) ref = loss;
      m.loss_equal = m.loss_equal && std::memcmp(&loss, &ref, sizeof loss) == 0;
      if (round > 0) m.t.push_back(dt);
    }
    fmt::print(stderr, "  round {} done\n", round);
  }
  const double base = median(modes[0].t), base_min = *std::min_element(modes[0].t.begin(), modes[0].t.end());
  fmt::print("\n### (b) Training step (forward_backward) at seq_len {}, micro batch 1, {} threads\n\n", T,
             runtime::num_threads());
  fmt::print("median of {} rounds after 1 warm-up round, modes interleaved; copy cap per copy thread; "
             "keep_last_layers {}; load average {} before, {} after\n\n",
             o.reps, o.keep, load0, loadavg());
  fmt::print("| mode | alpha | arena MiB | step ms (median) | min ms | max ms | vs baseline (median) | "
             "vs baseline (min) | fallbacks | loss bitwise |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const mode& m : modes) {
    const double med = median(m.t);
    const double mn = *std::min_element(m.t.begin(), m.t.end());
    fmt::print("| {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.3f}x | {:.3f}x | {} | {} |\n", m.name,
               m.memo && !m.memo->full_recompute ? fmt::format("{:.4f}", m.memo->alpha) : "-",
               m.arena ? fmt::format("{:.1f}", mib(m.arena_bytes)) : "-", med * 1e3,
               mn * 1e3, *std::max_element(m.t.begin(), m.t.end()) * 1e3, base > 0 ? med / base : 0.0,
               base_min > 0 ? mn / base_min : 0.0,
               m.a ? fmt::format("{}", m.a->stats().fallbacks) : "-", m.loss_equal ? "yes" : "NO");
  }
}

// (c) Fragmentation: planned arena vs caching allocator on the same trace.
void part_c(const bench_options& o, const parallel::model_weights& w) {
  fmt::print(stderr, "(c) fragmentation\n");
  fmt::print("\n### (c) Fragmentation: arena / max live vs caching allocator reserved / max live\n\n");
  fmt::print("| seq_len | mode | max live MiB | arena MiB | plan frag | plan method | caching reserved MiB | caching "
             "frag | plan s |\n|---:|---|---:|---:|---:|---|---:|---:|---:|\n");
  double worst_plan = 0, worst_cache = 0, best_cache = 1e9;
  std::vector<std::string> notes;
  for (int64_t T : o.frag_seqs)
    for (int m = 0; m < 3; ++m) {
      memory_settings s = settings(o, m == 1, 1.0, m == 2);
      s.device_budget = 0;
      const memory_report r = plan_memory(w, 1, T, s, /*measure=*/false);
      const char* name = m == 0 ? "no offload" : m == 1 ? "MEMO alpha=1" : "full recompute";
      fmt::print("| {} | {} | {:.1f} | {:.1f} | {:.4f} | {}{} | {:.1f} | {:.4f} | {:.2f} |\n", T, name,
                 mib(r.plan.max_live), mib(r.plan.arena_bytes), r.plan.fragmentation(), r.plan.method,
                 r.plan.bilevel ? ", bilevel" : "", mib(r.caching.reserved_peak), r.caching.fragmentation(),
                 r.plan.solve_s);
      if (!r.plan.note.empty()) notes.push_back(fmt::format("seq_len {} {}: {}", T, name, r.plan.note));
      worst_plan = std::max(worst_plan, r.plan.fragmentation());
      worst_cache = std::max(worst_cache, r.caching.fragmentation());
      best_cache = std::min(best_cache, r.caching.fragmentation());
      fmt::print(stderr, "  T {} {}: plan {:.4f} caching {:.4f}\n", T, name, r.plan.fragmentation(),
                 r.caching.fragmentation());
    }
  fmt::print("\nworst plan fragmentation {:.4f}; caching allocator {:.4f} .. {:.4f}\n", worst_plan, best_cache,
             worst_cache);
  for (const std::string& n : notes) fmt::print("* {}\n", n);
}

// (d) Planner solve time by model size.
void part_d(const bench_options& o) {
  fmt::print(stderr, "(d) planner by model size\n");
  struct size {
    int64_t layers, hidden;
    std::string preset;  // "": dense(hidden, layers, 8 heads, 4 kv heads)
  };
  std::vector<size> sizes = o.quick ? std::vector<size>{{2, 128, ""}, {4, 128, ""}}
                                    : std::vector<size>{{4, 256, ""},  {8, 256, ""},           {16, 512, ""},
                                                        {32, 512, ""}, {32, 1024, ""},         {0, 0, "tiny-mixtral"},
                                                        {0, 0, "tiny-qwen2-moe"}};
  fmt::print("\n### (d) Planner (plan_step via plan_memory, memo off) at seq_len {}, CBC limit {} s\n\n", o.plan_seq,
             o.planner_s);
  fmt::print("| layers | hidden | events | level-2 events | method | arena MiB | max live MiB | arena / max live | "
             "solve s | flat plan_mip: method | flat arena / lower bound | flat solve s |\n"
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|\n");
  for (const size& z : sizes) {
    const int64_t inter = z.hidden * 688 / 256;
    const parallel::model_weights w = parallel::model_weights::random_init(
        z.preset.empty() ? dense(z.hidden, z.layers, 8, 4, inter, o.vocab) : parallel::model_preset(z.preset), 7);
    memory_settings s;
    s.planner.time_limit_s = o.planner_s;
    s.keep_last_layers = o.keep;
    const memory_report r = plan_memory(w, 1, o.plan_seq, s, /*measure=*/false);
    // The same step planned flat (no bi-level split): the MIP over every event of the trace.
    const recorded_step rec = record_trace(w, 1, o.plan_seq, s);
    const plan f = plan_mip(rec.trace.events(), s.planner);
    fmt::print("| {} | {} | {} | {} | {}{}{} | {:.2f} | {:.2f} | {:.4f} | {:.2f} | {}{} | {:.4f} | {:.2f} |\n",
               z.preset.empty() ? fmt::format("{}", z.layers) : fmt::format("{} ({})", w.config().n_layers, z.preset),
               w.config().hidden, r.plan.size.size(), r.plan.level2_events, r.plan.method,
               r.plan.optimal ? " (optimal)" : "", r.plan.bilevel ? ", bilevel" : ", flat", mib(r.plan.arena_bytes),
               mib(r.plan.max_live),
               r.plan.fragmentation(), r.plan.solve_s, f.method, f.optimal ? " (optimal)" : "",
               f.lower_bound > 0 ? static_cast<double>(f.peak) / static_cast<double>(f.lower_bound) : 0.0, f.solve_s);
    if (!f.note.empty()) fmt::print(stderr, "    flat: {}\n", f.note);
    fmt::print(stderr, "  {} x {} {}: {} events, {}, {:.2f} s\n", w.config().n_layers, w.config().hidden, z.preset,
               r.plan.size.size(), r.plan.method, r.plan.solve_s);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench_options o;
  CLI::App app{"MEMO vs no offload / full recompute / caching allocator: max seq_len, step time, fragmentation, "
               "planner time"};
  app.add_flag("--quick", o.quick, "tiny model and sizes (smoke run, < 30 s)");
  app.add_option("--parts", o.parts, "which parts to run, e.g. abcd or bc");
  app.add_option("--hidden", o.hidden);
  app.add_option("--layers", o.layers);
  app.add_option("--heads", o.heads);
  app.add_option("--kv-heads", o.kv_heads);
  app.add_option("--intermediate", o.inter);
  app.add_option("--vocab", o.vocab);
  app.add_option("--budget-mib", o.budget_mib, "(a) device budget");
  app.add_option("--t-max", o.t_max, "(a) largest seq_len searched");
  app.add_option("--step-seq", o.step_seq, "(b) seq_len of the timed steps");
  app.add_option("--reps", o.reps, "(b) timed rounds");
  app.add_option("--gbps", o.gbps, "(a, b) copy bandwidth cap per copy thread, 1e9 B/s");
  app.add_option("--keep", o.keep, "keep_last_layers");
  app.add_option("--frag-seq", o.frag_seqs, "(c) seq_lens")->delimiter(',');
  app.add_option("--plan-seq", o.plan_seq, "(d) seq_len");
  app.add_option("--planner-s", o.planner_s, "CBC time limit (s)");
  app.add_option("--threads", o.threads, "0 = TROUPE_NUM_THREADS or all cores");
  CLI11_PARSE(app, argc, argv);
  if (o.quick) {
    o.hidden = 128, o.layers = 4, o.heads = 4, o.kv_heads = 2, o.inter = 344;
    o.budget_mib = 24, o.t_max = 4096, o.step_seq = 128, o.reps = 1, o.planner_s = 1, o.plan_seq = 64;
    o.frag_seqs = {128, 256};
  }
  if (o.threads > 0) runtime::set_num_threads(static_cast<int>(o.threads));
  const auto t0 = clk::now();
  const parallel::model_weights w =
      parallel::model_weights::random_init(dense(o.hidden, o.layers, o.heads, o.kv_heads, o.inter, o.vocab), 7);
  const runtime::model_config& c = w.config();
  fmt::print("## memo_bench: {} threads; model vocab {}, hidden {}, {} layers, heads {} / kv {}, intermediate {}, "
             "{} params{}\n",
             runtime::num_threads(), c.vocab_size, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.intermediate,
             w.parameter_count(), o.quick ? " (--quick)" : "");
  if (o.parts.find('a') != std::string::npos) part_a(o, w);
  if (o.parts.find('b') != std::string::npos) part_b(o, w);
  if (o.parts.find('c') != std::string::npos) part_c(o, w);
  if (o.parts.find('d') != std::string::npos) part_d(o);
  fmt::print("\ntotal {:.1f} s\n", seconds_since(t0));
  return 0;
}
