// parallel/memo/memory_plan.cpp — see memory_plan.h.
#include "parallel/memo/memory_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "runtime/error.h"
#include "runtime/io/hf_config.h"
#include "runtime/job_spec.h"

namespace troupe::parallel::memo {

using runtime::errc;

memory_settings memory_settings_of(const job::JobSpec& spec) {
  memory_settings s;
  const auto& m = spec.memory();
  s.device_budget = runtime::job_device_budget(spec);
  s.memo = m.memo().enabled();
  s.alpha = runtime::job_memo_alpha(spec);
  s.keep_last_layers = runtime::job_memo_keep_last_layers(spec);
  s.copy_bandwidth_gbps = m.memo().copy_bandwidth_gbps();
  s.host_limit = runtime::job_host_limit(spec);
  s.planner.time_limit_s = m.planner_time_limit_s() > 0 ? m.planner_time_limit_s() : 10.0;
  s.cache_dir = !m.plan_cache().empty() ? m.plan_cache() : spec.run_dir().empty() ? "" : spec.run_dir() + "/memo-plans";
  return s;
}

std::string format_bytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return fmt::format("{:.1f} MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return fmt::format("{:.1f} KiB", b / (1 << 10));
  return fmt::format("{} B", bytes);
}

namespace {

// One forward_backward of random tokens (all targets valid) under a recording arena.
recorded_step record_at(const model_weights& w, int64_t B, int64_t T, const memory_settings& s, double alpha,
                        decoder* with) {
  std::optional<decoder> own;
  if (with == nullptr) with = &own.emplace(w);
  decoder& dec = *with;
  model_weights grads = model_weights::zeros_like(w);
  std::vector<int32_t> ids(static_cast<size_t>(B * T)), tg(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<int32_t>((i * 7 + 3) % static_cast<size_t>(w.config().vocab_size));
    tg[i] = static_cast<int32_t>((i * 5 + 1) % static_cast<size_t>(w.config().vocab_size));
  }
  std::optional<memo_swap> swap;
  if (s.memo || s.full_recompute)
    swap.emplace(memo_options{.alpha = s.full_recompute ? 1.0 : alpha,
                              .keep_last_layers = s.keep_last_layers,
                              .copy_bandwidth_gbps = 0.0,
                              .full_recompute = s.full_recompute});
  auto rec = step_arena::recorder();
  fb_options o;
  o.arena = rec.get();
  o.memo = swap ? &*swap : nullptr;
  dec.forward_backward(ids.data(), tg.data(), B, T, grads, o);
  return rec->recorded();
}

// The trace at T: extrapolated from recordings at 16 and 32 and checked at 48 (memory_plan.h).
struct trace_model {
  recorded_step a, b;
  bool affine = false;
};

constexpr int64_t t1 = 16, t2 = 32, t3 = 48;

trace_model model_traces(const model_weights& w, int64_t B, const memory_settings& s, double alpha,
                         decoder* with = nullptr) {
  trace_model m;
  m.a = record_at(w, B, t1, s, alpha, with);
  m.b = record_at(w, B, t2, s, alpha, with);
  try {
    const recorded_step x = extrapolate_step(m.a, t1, m.b, t2, t3);
    const recorded_step c = record_at(w, B, t3, s, alpha, with);
    const auto& ex = x.trace.events();
    const auto& ec = c.trace.events();
    m.affine = ex.size() == ec.size();
    for (size_t i = 0; m.affine && i < ex.size(); ++i)
      m.affine = ex[i].size == ec[i].size && ex[i].alloc_time == ec[i].alloc_time && ex[i].free_time == ec[i].free_time;
  } catch (const runtime::error&) {
    m.affine = false;
  }
  return m;
}

recorded_step trace_at(const trace_model& m, const model_weights& w, int64_t B, int64_t T, const memory_settings& s,
                       double alpha, bool* extrapolated, decoder* with = nullptr) {
  *extrapolated = m.affine && T > 0;
  if (m.affine) {
    if (T == t1) return m.a;
    if (T == t2) return m.b;
    return extrapolate_step(m.a, t1, m.b, t2, T);
  }
  return record_at(w, B, T, s, alpha, with);
}

int64_t persistent_bytes(const model_weights& w) { return 16 * w.parameter_count(); }

std::string plan_key(const model_weights& w, int64_t B, int64_t T, const memory_settings& s, double alpha) {
  return fmt::format("{}|B={}|T={}|memo={}|alpha={:.6f}|keep={}|full_recompute={}|f32",
                     runtime::hf_config_to_json(w.config()), B, T, s.memo, alpha, s.keep_last_layers,
                     s.full_recompute);
}

// FLOP share of a dense layer's forward that token-wise recomputation repeats (everything but the
// attention core), from the shapes.
double tokenwise_share(const model_config& c, int64_t T) {
  const double C = static_cast<double>(c.hidden), QD = static_cast<double>(c.n_heads * c.head_dim),
               KVD = static_cast<double>(c.n_kv_heads * c.head_dim), I = static_cast<double>(c.intermediate);
  const double per_token = 2 * (C * (QD + 2 * KVD) + QD * C + 3 * C * I);
  const double attn = 2.0 * static_cast<double>(T) * QD;  // causal QK^T + PV, per token on average
  return per_token / (per_token + attn);
}

}  // namespace

memory_report plan_memory(const model_weights& w, int64_t batch, int64_t seq_len, const memory_settings& s,
                          bool measure, decoder* recorder) {
  TROUPE_CHECK(batch > 0 && seq_len > 0, errc::invalid_argument, "memory plan: batch {} and seq_len {} must be > 0",
               batch, seq_len);
  const model_config& c = w.config();
  memory_report r;
  r.batch = batch;
  r.seq_len = seq_len;
  r.settings = s;
  const int64_t L = c.n_layers, keep = std::min(s.keep_last_layers, L);
  if (measure) {
    r.layer_forward_s = measure_layer_forward_s(w, batch, seq_len);
    const layer_swap_bytes lb = swap_bytes(c, batch, seq_len, 0);
    const size_t probe = static_cast<size_t>(std::clamp<int64_t>(lb.input + lb.attn + lb.others, 1 << 20, 256 << 20));
    r.copy_gbps = measure_copy_gbps(probe, s.copy_bandwidth_gbps);
  }
  if (s.full_recompute) {
    r.alpha = 0;
    r.alpha_source = "full recompute";
  } else if (!s.memo) {
    r.alpha = 0;
    r.alpha_source = "memo off";
  } else if (s.alpha >= 0) {
    r.alpha = s.alpha;
    r.alpha_source = "given";
  } else {
    TROUPE_CHECK(measure, errc::invalid_argument, "memory plan: memo.alpha is auto but measuring is off");
    alpha_inputs in;
    in.layer_forward_s = r.layer_forward_s;
    in.host_gbps = r.copy_gbps;
    in.host_limit_bytes = s.host_limit;
    in.n_layers = L;
    in.keep_last_layers = keep;
    r.alpha_detail = choose_alpha(c, batch, seq_len, in);
    r.alpha = r.alpha_detail.alpha;
    r.alpha_source = "measured";
  }
  r.host_bytes = s.memo && !s.full_recompute ? host_bytes(c, batch, seq_len, r.alpha, keep) : 0;

  const trace_model m = model_traces(w, batch, s, r.alpha, recorder);
  const recorded_step rec = trace_at(m, w, batch, seq_len, s, r.alpha, &r.extrapolated, recorder);
  r.plan = plan_step(rec, s.planner, s.cache_dir, plan_key(w, batch, seq_len, s, r.alpha));
  r.caching = replay_caching_allocator(rec.trace.events());
  r.persistent_bytes = persistent_bytes(w);
  r.device_bytes = r.persistent_bytes + r.plan.arena_bytes;
  r.fits = s.device_budget == 0 || r.device_bytes <= s.device_budget;

  if (measure) {
    const double tf = r.layer_forward_s;
    const int64_t swapped = s.memo || s.full_recompute ? std::max<int64_t>(0, L - keep) : 0;
    r.predicted_compute_s = 3.0 * static_cast<double>(L) * tf;
    double share = tokenwise_share(c, seq_len);
    r.predicted_recompute_s = s.full_recompute ? static_cast<double>(swapped) * tf
                                               : static_cast<double>(swapped) * (1.0 - r.alpha) * share * tf;
    if (r.copy_gbps > 0 && !s.full_recompute)
      for (int64_t l = 0; l < swapped; ++l) {
        const layer_swap_bytes lb = swap_bytes(c, batch, seq_len, l);
        const int64_t N = batch * seq_len;
        const double bytes = static_cast<double>(lb.input + lb.attn) +
                             (N > 0 ? static_cast<double>(lb.others) / static_cast<double>(N) *
                                          std::round(r.alpha * static_cast<double>(N))
                                    : 0.0);
        const double copy = bytes / (r.copy_gbps * 1e9);
        r.predicted_exposed_copy_s += std::max(0.0, copy - tf) + std::max(0.0, copy - 2 * tf);
      }
    r.predicted_step_s = r.predicted_compute_s + r.predicted_recompute_s + r.predicted_exposed_copy_s;
  }
  return r;
}

int64_t find_max_seq(const model_weights& w, int64_t batch, const memory_settings& s, int64_t t_max,
                     int64_t multiple) {
  TROUPE_CHECK(s.device_budget > 0, errc::invalid_argument, "find_max_seq: no device budget is set");
  TROUPE_CHECK(multiple > 0 && t_max >= multiple, errc::invalid_argument,
               "find_max_seq: multiple {} and t_max {} must be positive with t_max >= multiple", multiple, t_max);
  const double alpha = s.memo && !s.full_recompute ? (s.alpha >= 0 ? s.alpha : 1.0) : 0.0;
  const trace_model m = model_traces(w, batch, s, alpha);
  const int64_t persistent = persistent_bytes(w);
  planner_options quick = s.planner;
  quick.use_cbc = false;
  quick.search_evals = 200;
  auto fits = [&](int64_t T, const planner_options& o) {
    bool ex = false;
    const recorded_step rec = trace_at(m, w, batch, T, s, alpha, &ex);
    if (persistent + max_live_bytes(rec.trace.events()) > s.device_budget) return false;  // no plan beats max live
    return persistent + plan_step(rec, o).arena_bytes <= s.device_budget;
  };
  int64_t lo = 0, hi = t_max / multiple;  // answer in units of `multiple`: lo fits (0 = none), hi+1 does not
  if (!fits(multiple, quick)) return 0;
  lo = 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(mid * multiple, quick))
      lo = mid;
    else
      hi = mid - 1;
  }
  // The full planner is never worse than greedy: try one step up, then confirm.
  if (lo < t_max / multiple && fits((lo + 1) * multiple, s.planner)) ++lo;
  return lo * multiple;
}

recorded_step record_trace(const model_weights& w, int64_t batch, int64_t seq_len, const memory_settings& s) {
  TROUPE_CHECK(batch > 0 && seq_len > 0, errc::invalid_argument, "record_trace: batch {} and seq_len {} must be > 0",
               batch, seq_len);
  const double alpha = s.memo && !s.full_recompute ? (s.alpha >= 0 ? s.alpha : 1.0) : 0.0;
  return record_at(w, batch, seq_len, s, alpha, nullptr);
}

std::string memory_does_not_fit(const memory_report& r, const model_weights& w, int64_t cp, int64_t t_max) {
  const memory_settings& s = r.settings;
  std::string msg = fmt::format(
      "the step does not fit memory.device_budget = {}: it needs {} (weights, gradients and AdamW moments {} + "
      "activation arena {}) at micro_batch {} x {} tokens per rank",
      format_bytes(s.device_budget), format_bytes(r.device_bytes), format_bytes(r.persistent_bytes),
      format_bytes(r.plan.arena_bytes), r.batch, r.seq_len);
  if (r.persistent_bytes >= s.device_budget) {
    msg += "; the weights, gradients and AdamW moments alone exceed it: raise the budget or use a smaller model";
    return msg;
  }
  const int64_t now = find_max_seq(w, r.batch, s, t_max, 16);
  msg += fmt::format(". The largest seq_len that fits with these settings is {} per rank ({} with parallel.cp = {})",
                     now, now * cp, cp);
  if (!s.memo || (s.alpha >= 0 && s.alpha < 1)) {
    memory_settings on = s;
    on.memo = true;
    on.alpha = 1.0;
    const int64_t with = find_max_seq(w, r.batch, on, t_max, 16);
    msg += fmt::format("; with MEMO on (memory.memo.enabled: true, alpha 1) it is {} per rank", with);
  }
  std::vector<std::string> help;
  if (r.batch > 1) help.push_back("a smaller batch.micro_batch (more batch.grad_accum)");
  help.push_back("more context-parallel ranks (parallel.cp)");
  if (s.memo && s.keep_last_layers > 0) help.push_back("memory.memo.keep_last_layers: 0");
  help.push_back("a larger memory.device_budget");
  msg += ". What helps: ";
  for (size_t i = 0; i < help.size(); ++i) msg += (i ? ", " : "") + help[i];
  return msg;
}

std::string describe(const memory_report& r) {
  const memory_settings& s = r.settings;
  std::string o;
  o += fmt::format("memory plan for micro_batch {} x {} tokens per rank\n", r.batch, r.seq_len);
  if (s.full_recompute)
    o += "  alpha                - (full recompute: each layer keeps x_in and reruns its forward)\n";
  else if (s.memo)
    o += fmt::format("  alpha                {:.4f} ({}{})\n", r.alpha, r.alpha_source,
                     r.alpha_source == "measured" ? ": " + r.alpha_detail.reason : "");
  else
    o += "  alpha                - (memo off: every activation stays on the device)\n";
  if (r.layer_forward_s > 0)
    o += fmt::format("  measured             layer forward {:.3f} ms, host copy {:.2f} GB/s{}\n",
                     r.layer_forward_s * 1e3, r.copy_gbps, s.copy_bandwidth_gbps > 0 ? " (capped)" : "");
  if (r.plan.bilevel)
    o += fmt::format("  level-1 peak         forward {}, backward {} (one layer's transients)\n",
                     format_bytes(r.plan.level1_forward_peak), format_bytes(r.plan.level1_backward_peak));
  else
    o += fmt::format("  level-1 peak         - ({})\n", r.plan.note);
  o += fmt::format("  level-2 peak         {} (the step arena; {} events, {}{}, {:.2f} s{})\n",
                   format_bytes(r.plan.arena_bytes), r.plan.level2_events, r.plan.method,
                   r.plan.optimal ? ", optimal" : "", r.plan.solve_s, r.plan.cache_hit ? ", cached" : "");
  o += fmt::format("  persistent           {} (fp32 weights, gradients, AdamW m and v)\n",
                   format_bytes(r.persistent_bytes));
  o += fmt::format("  device total         {}{}\n", format_bytes(r.device_bytes),
                   s.device_budget > 0 ? fmt::format(" of the {} budget: {}", format_bytes(s.device_budget),
                                                     r.fits ? "fits" : "DOES NOT FIT")
                                       : " (no budget set)");
  o += fmt::format("  host                 dram: {} (swapped activations{})\n", format_bytes(r.host_bytes),
                   s.host_limit > 0 ? fmt::format(", limit {}", format_bytes(s.host_limit)) : "");
  if (r.predicted_step_s > 0)
    o += fmt::format(
        "  predicted step       {:.3f} s (model: compute {:.3f} + recompute {:.3f} + exposed copy {:.3f})\n",
        r.predicted_step_s, r.predicted_compute_s, r.predicted_recompute_s, r.predicted_exposed_copy_s);
  o += fmt::format("  fragmentation        plan {:.3f} (arena / max live {}) vs caching allocator {:.3f} "
                   "(reserved {} for the same trace)\n",
                   r.plan.fragmentation(), format_bytes(r.plan.max_live), r.caching.fragmentation(),
                   format_bytes(r.caching.reserved_peak));
  o += fmt::format("  trace                {}\n", r.extrapolated ? "extrapolated from steps recorded at 16 and 32 "
                                                               "tokens (checked at 48)"
                                                             : "recorded at this length");
  return o;
}

}  // namespace troupe::parallel::memo
