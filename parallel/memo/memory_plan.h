// parallel/memo/memory_plan.h — the whole memory plan of a training job's rank: what the device
// budget must hold (weights, gradients, AdamW moments, the planned step arena), what goes to
// host, α, the predicted step time, and the fragmentation against a caching allocator. Used by
// the trainer (refuse to start when it does not fit) and by `troupe plan`.
//
//   memory_settings s = memory_settings_of(spec);                 // memory.* of a job spec
//   memory_report r = plan_memory(weights, micro_batch, local_T, s);
//   if (!r.fits) throw ... (memory_does_not_fit names the largest seq_len that fits)
//   step_arena arena(r.plan);                                     // arena.h
//   int64_t T = find_max_seq(weights, micro_batch, s, 1 << 20, 64);
//
// How the trace is obtained: the real decoder runs one forward_backward under a recording arena
// at two short lengths (16 and 32 tokens per sequence, the same batch) and the trace at T is
// extrapolated (every size is affine in T, lifetimes do not change: extrapolate_step), checked
// against a third recording at 48 tokens; when the check fails the step is recorded at T itself.
// So planning costs three short steps, not a step at T.
//
// Invariants:
//   1. device_bytes = persistent_bytes + plan.arena_bytes; persistent = 16 bytes per parameter
//      (fp32 weights, gradients, AdamW m and v). A tensor live for the whole step gains nothing
//      from the MIP (it sits below everything at any optimum), so persistent tensors are one
//      slab under the arena instead of MIP events (a documented deviation).
//   2. fits == (device_budget == 0 || device_bytes <= device_budget).
//   3. alpha: the given value, or choose_alpha (alpha.h) from the layer forward time and copy
//      bandwidth measured now, within host_limit. host_bytes = alpha.h's host_bytes for it.
//   4. The predicted step time is a model, labelled so: 3 x the measured layer forward per
//      layer, plus the recomputed share (1 - α) of the token-wise FLOPs of swapped layers, plus
//      copy time that the next layer's compute cannot hide.
//   5. caching = the same trace replayed through the PyTorch-like caching allocator.
//   6. full_recompute (benchmarks; memory_settings_of never sets it): the trace is recorded with
//      memo_swap's full_recompute, alpha is 0 ("full recompute"), host_bytes 0, and the predicted
//      recompute is one layer forward per recomputed layer.
#pragma once
#include <cstdint>
#include <string>

#include "parallel/memo/alpha.h"
#include "parallel/memo/arena.h"
#include "parallel/memo/caching_allocator_sim.h"
#include "parallel/memo/planner.h"
#include "parallel/model/model_weights.h"
#include "runtime/proto/job.pb.h"

namespace troupe::parallel {
class decoder;
}

namespace troupe::parallel::memo {

struct memory_settings {
  int64_t device_budget = 0;      // bytes; 0 = no budget
  bool memo = false;              // swap + recompute
  bool full_recompute = false;    // the baseline instead: keep x_in, rerun each layer's forward (swap.h
                                  // invariant 8; α, copy bandwidth and host_limit unused; not a job setting)
  double alpha = -1;              // -1 = measured (invariant 3)
  int64_t keep_last_layers = 2;
  double copy_bandwidth_gbps = 0; // cap on each copy thread; 0 = none
  int64_t host_limit = 0;         // bytes for swapped activations; 0 = unlimited
  planner_options planner;
  std::string cache_dir;          // "" = no plan cache
};

memory_settings memory_settings_of(const job::JobSpec& spec);

struct memory_report {
  int64_t batch = 0, seq_len = 0;  // per rank: micro batch and local tokens per sequence
  memory_settings settings;
  double alpha = 0;                // used (0 when memo is off)
  std::string alpha_source;        // "given", "measured", "memo off"
  alpha_result alpha_detail;       // when measured
  double layer_forward_s = 0;      // measured (0 when measure = false)
  double copy_gbps = 0;            // measured copy bandwidth (with the cap)
  int64_t persistent_bytes = 0;    // invariant 1
  step_plan plan;
  int64_t device_bytes = 0;
  int64_t host_bytes = 0;
  caching_replay caching;
  bool extrapolated = false;       // the trace came from short recordings
  double predicted_step_s = 0, predicted_compute_s = 0, predicted_recompute_s = 0, predicted_exposed_copy_s = 0;
  bool fits = true;
};

// `measure` = false skips the timing (alpha must then be given or memo off; no prediction).
// `recorder`: the decoder to record the steps with (the trainer passes its own, so context-
// parallel buffers are in the trace; every rank of its cp group must then call this in step);
// nullptr = a plain decoder over w.
memory_report plan_memory(const model_weights& w, int64_t batch, int64_t seq_len, const memory_settings& s,
                          bool measure = true, decoder* recorder = nullptr);

// The largest seq_len (a multiple of `multiple`, <= t_max) whose device bytes fit s.device_budget
// with these settings (α as given, or 1 when measured: the most that may be swapped); 0 when even
// `multiple` does not fit. Probes use the greedy planner; the answer is checked with the full one.
int64_t find_max_seq(const model_weights& w, int64_t batch, const memory_settings& s, int64_t t_max,
                     int64_t multiple);

// The error text of a job that does not fit: the budget, what it needs, the largest seq_len that
// fits now and with MEMO on (α = 1), and the settings that would help.
std::string memory_does_not_fit(const memory_report& r, const model_weights& w, int64_t cp, int64_t t_max);

// The recorded step at (B, T) with these settings (the trace plan_memory plans and replays through
// the caching allocator): memo at α = s.alpha (1 when s.alpha < 0), or full recompute, or neither.
// Recorded at T itself (no extrapolation).
recorded_step record_trace(const model_weights& w, int64_t batch, int64_t seq_len, const memory_settings& s);

// The report as `troupe plan` prints it.
std::string describe(const memory_report& r);

// "1.5 GiB" style.
std::string format_bytes(int64_t bytes);

}  // namespace troupe::parallel::memo
