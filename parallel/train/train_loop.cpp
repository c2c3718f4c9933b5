// parallel/train/train_loop.cpp — see train_loop.h.
#include "parallel/train/train_loop.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <memory>

#include "parallel/cxl/placement.h"
#include "parallel/train/metrics.h"
#include "runtime/allocator.h"
#include "runtime/device.h"
#include "runtime/job_spec.h"

namespace troupe::parallel {

namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::map<std::string, int64_t> as_map(const nlohmann::json& j) {
  std::map<std::string, int64_t> m;
  for (auto it = j.begin(); it != j.end(); ++it) m[it.key()] = it.value().get<int64_t>();
  return m;
}

}  // namespace

nlohmann::json memory_by_tier(bool peak, const trainer& t) {
  nlohmann::json m;
  auto& host = runtime::cpu_allocator();
  m["host"] = static_cast<int64_t>(peak ? host.peak_bytes() : host.allocated_bytes());
  // MEMO: the step arena (the budgeted "device" on the CPU: its reserved block, or its peak live bytes) and the
  // host buffers of the swapped activations.
  if (t.arena()) {
    const memo::arena_stats a = t.arena()->stats();
    m["arena"] = static_cast<int64_t>(peak ? a.peak_bytes : static_cast<size_t>(t.memory_plan()->plan.arena_bytes));
  }
  if (t.memo()) m["memo_host"] = static_cast<int64_t>(t.memo()->stats().host_bytes);
  // Host placement through the tiers (trainer.h invariant 6): the bytes the plan puts on DRAM and CXL
  // (static for the run, so current = peak; an emulated CXL tier is still reported as "cxl").
  if (const cxl::placement_plan* p = t.placement()) {
    m["dram"] = p->dram_bytes;
    m["cxl"] = p->cxl_bytes;
  }
  if (runtime::cuda_status().available) {
    try {
      auto& dev = runtime::cuda_allocator(0);
      if (dev.peak_bytes() > 0) m["device"] = static_cast<int64_t>(peak ? dev.peak_bytes() : dev.allocated_bytes());
    } catch (const std::exception&) {
    }
  }
  return m;
}

nlohmann::json run_training(trainer& t, const train_loop_options& o) {
  const auto& spec = t.spec();
  const bool lead = t.comms().rank == 0;
  const int64_t max_steps = spec.train().max_steps();
  const int64_t log_every = std::max<int64_t>(1, spec.logging().every_steps());
  const int64_t eval_every = spec.train().eval_every_steps();
  const int64_t ckpt_every = spec.checkpoint().every_steps();
  const auto& cfg = t.weights().config();
  const double flops_per_token =
      train_flops_per_token(cfg, t.weights().parameter_count(), spec.batch().seq_len());
  const double peak_total = o.peak_gflops * 1e9 * t.comms().world_size;

  std::unique_ptr<metrics_writer> metrics;
  nlohmann::json start;
  if (lead) {
    metrics = std::make_unique<metrics_writer>(spec.logging().metrics_jsonl());
    start = {{"kind", "start"},
             {"time", utc_now()},
             {"world_size", t.comms().world_size},
             {"dp", spec.parallel().dp()},
             {"cp", spec.parallel().cp()},
             {"params", t.weights().parameter_count()},
             {"seq_len", spec.batch().seq_len()},
             {"global_batch_tokens", spec.batch().global_batch() * spec.batch().seq_len()},
             {"peak_gflops", o.peak_gflops},
             {"flops_per_token", flops_per_token},
             {"start_step", t.steps_done()},
             {"spec", runtime::describe(spec)}};
    if (const memo::memory_report* mp = t.memory_plan()) {
      start["memory_plan"] = {{"alpha", mp->alpha},
                              {"alpha_source", mp->alpha_source},
                              {"arena_bytes", mp->plan.arena_bytes},
                              {"persistent_bytes", mp->persistent_bytes},
                              {"device_bytes", mp->device_bytes},
                              {"device_budget", mp->settings.device_budget},
                              {"host_bytes", mp->host_bytes},
                              {"fragmentation", mp->plan.fragmentation()},
                              {"caching_fragmentation", mp->caching.fragmentation()}};
      if (o.print) fmt::print("{}", memo::describe(*mp));
    }
    metrics->write(start);
  }

  const auto run_t0 = std::chrono::steady_clock::now();
  const int64_t first_step = t.steps_done();
  double ema_step_s = 0, last_loss = NAN, last_val = NAN, best_val = INFINITY;
  int64_t tokens = 0;
  bool stopped = false;
  std::string last_ckpt;
  double train_s = 0;

  auto evaluate = [&](int64_t step) {
    if (!spec.has_data() || spec.data().val_fraction() <= 0) return;
    const auto e0 = std::chrono::steady_clock::now();
    last_val = t.evaluate();
    best_val = std::min(best_val, last_val);
    const double es = std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
    if (!lead) return;
    const int64_t val_tokens = std::max<int64_t>(1, spec.train().eval_batches()) * spec.batch().micro_batch() *
                               spec.parallel().dp() * spec.batch().seq_len();
    metrics->write({{"kind", "val"}, {"step", step}, {"val_loss", last_val}, {"val_tokens", val_tokens},
                    {"eval_s", es}});
    if (o.print) {
      if (o.tty) fmt::print("\r\033[K");
      fmt::print("step {}/{} | val loss {:.4f} (best {:.4f})\n", step, max_steps, last_val, best_val);
      std::fflush(stdout);
    }
  };

  // The starting point, so the summary can show how far validation loss fell.
  double initial_val = NAN;
  if (first_step == 0 && max_steps > 0) {
    evaluate(0);
    initial_val = last_val;
  }
  while (t.steps_done() < max_steps) {
    const step_stats s = t.step();
    const int64_t step = s.step;
    train_s += s.seconds;
    tokens += s.tokens;
    last_loss = s.loss;
    ema_step_s = step == first_step + 1 ? s.seconds : 0.9 * ema_step_s + 0.1 * s.seconds;
    const double tps = static_cast<double>(s.tokens) / std::max(1e-9, s.seconds);
    const double mfu = peak_total > 0 ? flops_per_token * tps / peak_total : 0.0;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_t0).count();
    nlohmann::json rec{{"kind", "train"},
                       {"step", step},
                       {"loss", s.loss},
                       {"lr", s.lr},
                       {"grad_norm", s.grad_norm},
                       {"tokens", tokens},
                       {"tokens_per_s", tps},
                       {"mfu", mfu},
                       {"step_ms", s.seconds * 1e3},
                       {"exposed_comm_ms", s.exposed_comm_s * 1e3},
                       {"elapsed_s", elapsed},
                       {"activation_bytes", static_cast<int64_t>(t.activation_bytes())},
                       {"mem", memory_by_tier(false, t)},
                       {"mem_peak", memory_by_tier(true, t)}};
    if (auto* ep = t.expert_parallel()) {  // parallel.ep: how the MoE layers split the last step
      rec["ep"] = {{"max_over_mean", ep->step_max_over_mean()},
                   {"weight_bytes", static_cast<int64_t>(ep->step_weight_bytes())}};
    }
    if (o.on_step) o.on_step(rec);
    const bool last = step == max_steps;
    if (lead) {
      if (step % log_every == 0 || last || step == first_step + 1) metrics->write(rec);
      progress_info p;
      p.step = step;
      p.max_steps = max_steps;
      p.loss = s.loss;
      p.lr = s.lr;
      p.tokens_per_s = tps;
      p.mfu = mfu;
      p.eta_s = ema_step_s * static_cast<double>(max_steps - step);
      p.mem = as_map(rec["mem"]);
      if (o.print && o.tty) {
        fmt::print("\r\033[K{}", format_progress(p));
        std::fflush(stdout);
      } else if (o.print && (step % log_every == 0 || last)) {
        fmt::print("{}\n", format_progress(p));
        std::fflush(stdout);
      }
    }
    if ((eval_every > 0 && step % eval_every == 0) || last) evaluate(step);
    if ((ckpt_every > 0 && step % ckpt_every == 0) || last) {
      const std::string dir = t.save_checkpoint();
      if (lead) {
        last_ckpt = dir;
        metrics->write({{"kind", "checkpoint"}, {"step", step}, {"dir", dir}});
      }
    }
    if (o.stop_requested && o.stop_requested()) {
      stopped = t.steps_done() < max_steps;
      break;
    }
  }
  if (lead && o.print && o.tty) fmt::print("\n");

  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_t0).count();
  const double tps = tokens / std::max(1e-9, train_s);
  nlohmann::json summary{{"kind", "summary"},
                         {"steps", t.steps_done()},
                         {"steps_this_run", t.steps_done() - first_step},
                         {"final_loss", last_loss},
                         {"tokens", tokens},
                         {"elapsed_s", elapsed},
                         {"train_s", train_s},
                         {"tokens_per_s", tps},
                         {"mfu", peak_total > 0 ? flops_per_token * tps / peak_total : 0.0},
                         {"exposed_comm_s", t.sync().exposed_wait_s()},
                         {"arena_fallbacks", t.arena() ? t.arena()->stats().fallbacks : 0},
                         {"mem_peak", memory_by_tier(true, t)},
                         {"checkpoint", last_ckpt},
                         {"stopped", stopped}};
  if (!std::isnan(initial_val)) summary["initial_val_loss"] = initial_val;
  if (!std::isnan(last_val)) {
    summary["final_val_loss"] = last_val;
    summary["best_val_loss"] = best_val;
  }
  if (lead) {
    metrics->write(summary);
    if (o.print) {
      fmt::print("{}\n", format_summary(start, summary));
      std::fflush(stdout);
    }
  }
  return summary;
}

}  // namespace troupe::parallel
