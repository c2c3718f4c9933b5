// parallel/memo/planner.h — MEMO memory planning: offline dynamic storage allocation (every
// tensor of a recorded trace gets a fixed byte offset in one arena) solved as a MIP with
// COIN-OR CBC, warm-started from a greedy best-fit plan that is also the fallback.
//
//   const auto& ev = trace.events();                        // alloc_trace.h, closed
//   plan g = plan_greedy_best_fit(ev);                      // fast, usually near optimal
//   planner_options o; o.time_limit_s = 5;
//   plan p = plan_mip(ev, o);                               // p.method: "cbc-optimal", ...
//   verify_plan(ev, p, arena_bytes);                        // throws errc::internal on a bad plan
//   char* addr_of_i = arena_base + p.offset[i];
//   bilevel_plan b = plan_bilevel(problem, opts);           // ALGORITHMS.md "bi-level"
//
// The MIP (ALGORITHMS.md): offsets A_i >= 0, peak M, A_i + S_i <= M; for each pair (i, j) of
// tensors with overlapping lifetimes a binary z_ij with A_i + S_i <= A_j + z_ij·Mcap and
// A_j + S_j <= A_i + (1 - z_ij)·Mcap; minimise M. Here S_i is the size rounded up to the
// alignment; Mcap is the warm start's peak rounded up (every better plan fits under it, so
// the big-M rows are exact; a better warm start makes them tighter); M >= the live-bytes
// bound is a column bound (CBC stops as soon as a plan meets it). Sizes are divided by their
// gcd before solving; with unpadded sizes the larger tensor of the largest overlapping pair
// is fixed below the other (a plan and its mirror image have the same peak). The warm start
// is greedy best fit improved by a local search (plan_local_search). CBC does not run when
// the warm start meets the bound. The planner reads only the z_ij from CBC and places every tensor at the lowest
// offset its "below" neighbours allow (longest path in the order DAG): offsets are exact
// integers, aligned, and no higher than CBC's.
//
// Invariants:
//   1. Every plan returned here verifies (verify_plan) against its events, with
//      arena = plan.peak; offsets are multiples of the alignment.
//   2. plan.peak = max_i(offset_i + size_i) (raw sizes) >= plan.lower_bound, where
//      lower_bound = max over ticks of the live bytes (sizes rounded up to the alignment,
//      less the largest rounding of one live tensor: the top one need not be padded).
//   3. plan_mip never returns a higher peak than plan_greedy_best_fit on the same input.
//      When optimal is set (method "cbc-optimal", or peak == lower_bound) no plan whose
//      offsets are multiples of the alignment has a lower peak.
//   4. Without CBC (not built, use_cbc = false, too many pairs, or a CBC failure) plan_mip
//      returns its warm start (method "greedy" or "greedy+search") and says why in note.
//      Greedy or the search meeting the lower bound skips CBC (optimal, note says so).
//   5. CBC calls are serialised by a process-wide mutex (the 2.10 C interface shares state).
//   6. Bad input (non-positive size, a never-freed event) throws errc::invalid_argument.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallel/memo/alloc_trace.h"

namespace troupe::parallel::memo {

struct planner_options {
  double time_limit_s = 10.0;  // CBC wall-clock limit
  bool use_cbc = true;         // false: greedy only
  int64_t alignment = 64;      // offsets are multiples of this (bytes, a power of two is not required)
  int64_t max_pairs = 20000;   // more overlapping pairs than this: no CBC (note says so)
  int64_t search_evals = 2000; // local-search placements tried before CBC (0: none)
  int log_level = 0;           // CBC's log level (0 = silent)
};

struct plan {
  std::vector<int64_t> offset;  // byte offset of events[i]
  int64_t peak = 0;             // arena bytes needed: max(offset + size)
  std::string method;           // "cbc-optimal", "cbc-time-limit", "greedy", "greedy+search"
  bool optimal = false;         // proven (by CBC, or peak == lower_bound)
  double solve_s = 0;           // wall time of the whole call (greedy included)
  int64_t lower_bound = 0;      // invariant 2
  int64_t greedy_peak = 0;      // plan_greedy_best_fit's peak (== peak for "greedy")
  std::string note;             // why CBC was not used / what it said; "" otherwise

  nlohmann::json to_json() const;
  static plan from_json(const nlohmann::json& j);  // errc::format naming the key
};

// True when this build links CBC.
bool cbc_available();

// Invariant 2's bound for these events at this alignment.
int64_t plan_lower_bound(const std::vector<alloc_event>& ev, int64_t alignment);

// Greedy offline best fit. Several orders are tried (size desc, lifetime desc, size×lifetime
// desc, alloc time asc); in each order a tensor goes into the smallest gap among the placed
// tensors whose lifetimes overlap its own that holds it (lowest such gap on ties), else on
// top of them. The best peak wins.
plan plan_greedy_best_fit(const std::vector<alloc_event>& ev, int64_t alignment = 64);

// Local search over placement orders: tensors are placed bottom-left (each at the lowest
// offset free of its placed lifetime neighbours) in an order that starts from start's offsets
// and is changed by random swaps and moves (a fixed seed: deterministic), keeping changes that
// do not raise the peak; at most `evals` placements (fewer on big traces), stops at the lower
// bound. Bottom-left over all orders reaches the optimum, so this closes most of greedy's gap.
// Never higher than start. method "greedy+search".
plan plan_local_search(const std::vector<alloc_event>& ev, const plan& start, int64_t alignment, int64_t evals);

// greedy -> local search (when greedy misses the bound) -> CBC warm-started from the best of
// them (and never worse); see the header comment.
plan plan_mip(const std::vector<alloc_event>& ev, const planner_options& o = {});

// Throws errc::internal naming the two tensors (name, id, byte range, lifetime) that are live
// at the same tick and share bytes, or the one outside [0, arena_bytes), or a plan whose size
// does not match the events.
void verify_plan(const std::vector<alloc_event>& ev, const plan& p, int64_t arena_bytes);

// Bi-level planning (ALGORITHMS.md). Level 1 plans one layer's forward transients and,
// separately, its backward transients (all layers are identical, so the same offsets serve
// every layer). Level 2 plans `global`: embeddings, logits/loss, swap buffers, persistent
// tensors, and one placeholder event per layer forward / backward whose lifetime is that
// layer's forward / backward and whose size the planner sets to the level-1 peak.
//
//   bilevel_problem bp{fwd_trace.events(), bwd_trace.events(), global.events(), {2, 5}, {9, 12}};
//   bilevel_plan b = plan_bilevel(bp, opts);
//   // layer l's forward tensor i: b.global.offset[bp.forward_blocks[l]] + b.layer_forward.offset[i]
struct bilevel_problem {
  std::vector<alloc_event> layer_forward, layer_backward;
  std::vector<alloc_event> global;
  std::vector<size_t> forward_blocks, backward_blocks;  // indices into global (sizes ignored)
};

struct bilevel_plan {
  plan layer_forward, layer_backward, global;
  std::vector<alloc_event> global_events;  // global with the block sizes filled in
  int64_t level1_peak = 0;                 // max(layer_forward.peak, layer_backward.peak)
  int64_t level2_peak = 0;                 // global.peak: the arena size

  nlohmann::json to_json() const;
  static bilevel_plan from_json(const nlohmann::json& j);
};

// errc::invalid_argument when a block index is out of range or listed twice.
bilevel_plan plan_bilevel(const bilevel_problem& bp, const planner_options& o = {});

// verify_plan on all three levels (arena: level1 peaks for the layers, level2_peak for global).
void verify_bilevel_plan(const bilevel_problem& bp, const bilevel_plan& b);

}  // namespace troupe::parallel::memo
