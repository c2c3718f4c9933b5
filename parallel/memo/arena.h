// parallel/memo/arena.h — MEMO's step arena: the device's only allocator for a training step's
// activations and transients. One step is recorded (every allocation, on a logical clock, with
// the layer boundaries the decoder marks), planned with the bi-level MIP (planner.h), and every
// later step gets each allocation at its planned offset inside one block of plan.arena_bytes.
//
//   auto rec = step_arena::recorder();                       // serves from the heap, records
//   fb_options o; o.arena = rec.get();
//   dec.forward_backward(ids, targets, B, T, grads, o);
//   step_plan p = plan_step(rec->recorded(), {});            // bi-level MIP, verified
//   if (p.arena_bytes > budget) ... refuse to start (trainer.cpp names the largest seq_len)
//   step_arena arena(p);                                     // one block, allocated once
//   o.arena = &arena;
//   dec.forward_backward(ids, targets, B, T, grads, o);      // same bits, allocations planned
//
// Invariants:
//   1. Recording: allocate/deallocate go to the CPU heap and append to an alloc_trace (one tick
//      each); mark() records the clock between ticks. end_step() closes the trace; a tensor
//      still live then counts as live to the end of the step and is reported in the note.
//   2. Planned: the k-th allocation of a step returns base + offset[k] when its size equals the
//      plan's size[k] and its bytes are free of every live block (checked on every call, so an
//      unplanned lifetime can never corrupt a live tensor). Anything else (a size or count that
//      differs from the recorded step, an overlap) is served from the heap instead, counted in
//      stats().fallbacks and logged once per step: correctness is kept, the budget is not.
//   3. allocate/deallocate are thread-safe (a tensor may die on another thread); the k-th
//      allocation order comes from the thread that runs the step (allocator_scope).
//   4. plan_step verifies the flattened plan against the whole recorded trace (verify_plan):
//      no two tensors live at one tick share a byte and all lie in [0, arena_bytes).
//   5. Level 1 (ALGORITHMS.md): a layer's forward transients are the allocations made and freed
//      between its forward marks (same for backward). When every layer's transients have the
//      same sizes and relative lifetimes, one level-1 plan serves all layers and level 2 places
//      one block per layer phase next to the global tensors (saved activations, rounding
//      buffers, embeddings, logits/loss). Otherwise (dense and MoE layers mixed) the whole
//      trace is planned flat with the same MIP, and note says so.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "parallel/memo/alloc_trace.h"
#include "parallel/memo/planner.h"
#include "runtime/allocator.h"

namespace troupe::parallel::memo {

enum class step_phase { forward_begin, forward_end, backward_begin, backward_end };

struct step_mark {
  step_phase phase = step_phase::forward_begin;
  int64_t layer = 0;
  int64_t tick = 0;  // the clock when marked: events with alloc_time >= tick come after it
};

// One recorded step: the closed trace (events()[k] is the step's k-th allocation) and the marks.
struct recorded_step {
  alloc_trace trace;
  std::vector<step_mark> marks;
  int64_t live_at_end = 0;  // allocations not freed by end_step (closed at the end)
};

struct step_plan {
  std::vector<int64_t> size;    // bytes of the k-th allocation (the recorded request, >= 1)
  std::vector<int64_t> offset;  // its offset in the arena
  int64_t arena_bytes = 0;      // the arena: max(offset + size)
  int64_t max_live = 0;         // no plan can be smaller (max over time of the live bytes)
  bool bilevel = false;         // level-1 + level-2 (else one flat plan of the whole trace)
  int64_t level1_forward_peak = 0, level1_backward_peak = 0;  // bilevel only
  int64_t level2_events = 0;    // events planned at level 2 (or all events when flat)
  std::string method;           // the top-level plan's method (planner.h)
  bool optimal = false;         // the top-level plan is proven optimal
  double solve_s = 0;           // planning wall time, all levels
  bool cache_hit = false;
  std::string note;
  double fragmentation() const {  // arena / max live: 1.0 = no fragmentation
    return max_live > 0 ? static_cast<double>(arena_bytes) / static_cast<double>(max_live) : 1.0;
  }
};

struct arena_stats {
  int64_t steps = 0;
  int64_t allocations = 0;  // in the last step
  int64_t fallbacks = 0;    // allocations served from the heap (invariant 2), all steps
  size_t live_bytes = 0, peak_bytes = 0;
};

class step_arena final : public runtime::allocator {
 public:
  static std::unique_ptr<step_arena> recorder();
  explicit step_arena(step_plan p);  // planned; allocates arena_bytes once and touches every page
  ~step_arena() override;
  step_arena(const step_arena&) = delete;
  step_arena& operator=(const step_arena&) = delete;

  bool recording() const { return recording_; }
  void begin_step();
  void end_step();
  void mark(step_phase phase, int64_t layer);

  // After end_step of a recording arena.
  const recorded_step& recorded() const { return rec_; }
  const step_plan& plan() const { return plan_; }
  arena_stats stats() const;

  void* allocate(size_t bytes) override;
  void deallocate(void* ptr, size_t bytes) override;
  runtime::device dev() const override { return runtime::device::cpu(); }
  std::string name() const override { return recording_ ? "memo-recorder" : "memo-arena"; }
  size_t allocated_bytes() const override;
  size_t peak_bytes() const override;

 private:
  step_arena() = default;
  void* fallback(size_t bytes, const std::string& why);

  struct block {
    int64_t k;       // allocation index in the step
    int64_t offset;  // -1: heap
    int64_t size;
  };
  bool recording_ = true;
  mutable std::mutex mu_;
  recorded_step rec_;
  step_plan plan_;
  std::byte* base_ = nullptr;
  int64_t next_ = 0;
  bool in_step_ = false, warned_ = false;
  std::unordered_map<void*, block> live_;
  arena_stats stats_;
};

// Bi-level (or flat) plan of a recorded step; throws errc::internal when the result does not
// verify (a planner bug), errc::invalid_argument for a trace without events. With cache_dir
// set, plans are cached there under `key` (plan_cache.h; the caller puts model config,
// seq_len, α and dtypes into the key).
step_plan plan_step(const recorded_step& r, const planner_options& o = {}, const std::string& cache_dir = "",
                    const std::string& key = "");

// The recorded step at another sequence length, from recordings at two lengths ta < tb with the
// same batch: the events, lifetimes and marks must be identical and every size affine in T
// (exact integers). Throws errc::invalid_argument naming the first event that is not.
recorded_step extrapolate_step(const recorded_step& a, int64_t ta, const recorded_step& b, int64_t tb, int64_t t);

}  // namespace troupe::parallel::memo
