// parallel/train/train_loop.h — a whole run on one rank: steps to train.max_steps,
// validation, checkpoints, the metrics file, the live progress line and the summary.
//
//   train_loop_options o;
//   o.tty = isatty(1);
//   o.peak_gflops = kernels::cpu::sgemm_peak_gflops(2048, 3);
//   o.on_step = [&](const nlohmann::json& rec) { ctx.report_progress(...); };  // to the supervisor
//   nlohmann::json summary = run_training(*trainer, o);
//
// Invariants:
//   1. Rank 0 alone writes: metrics.jsonl (a "start" record, "train" records every
//      logging.every_steps and at the last step, "val" records, a "summary"), checkpoints
//      (every checkpoint.every_steps and at the end) and what is printed. Every rank calls
//      on_step after every step (the supervisor sees each rank's progress).
//   2. Validation runs before the first step of a fresh run, every train.eval_every_steps
//      and after the last step (when there is validation data); every rank takes part.
//   3. MFU = train_flops_per_token * tokens/s / (peak_gflops * 1e9 * ranks), tokens/s
//      counting the global batch over the step's wall time.
//   4. Memory per tier is what troupe's allocators hold: "host" (and "device" when a GPU
//      allocator is in use), current and peak.
//   5. stop_requested() returning true ends the loop after the current step with no
//      checkpoint; the summary then says "stopped": true.
#pragma once
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "parallel/train/trainer.h"

namespace troupe::parallel {

struct train_loop_options {
  bool tty = false;            // rank 0 redraws one progress line in place
  bool print = true;           // rank 0 prints progress lines (when not a TTY) and the summary
  double peak_gflops = 0;      // one rank's sgemm peak; 0 = MFU not reported
  std::function<void(const nlohmann::json& record)> on_step;  // every rank, every step ("train" record)
  std::function<bool()> stop_requested;
};

// -> the summary record (also written to the metrics file on rank 0).
nlohmann::json run_training(trainer& t, const train_loop_options& o);

// Memory per tier through troupe's allocators, current or peak: {"host": bytes, ["device": bytes],
// ["arena": MEMO step arena live bytes], ["memo_host": swapped activations on host],
// ["dram", "cxl": bytes the host placement (memory.tiers) put on each tier kind]}.
nlohmann::json memory_by_tier(bool peak, const trainer& t);

}  // namespace troupe::parallel
