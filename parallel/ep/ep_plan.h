// parallel/ep/ep_plan.h — who computes which tokens of which expert: standard expert parallelism,
// LLEP (least-loaded EP, arXiv 2601.17111) and the EPLB replication baseline (DeepSeek), all as one
// list of chunks that parallel/ep/ep_layer.h executes (../shared/ALGORITHMS.md, LLEP section).
//
//   ep_placement native = ep_placement::contiguous(/*experts=*/128, /*ranks=*/8);
//   std::vector<int64_t> loads = ...;                     // rows (token-expert pairs) per expert
//   ep_plan ep   = ep_plan_standard(loads, native);
//   ep_plan ll   = llep_plan(loads, native, {.lambda = 1.3, .alpha = 1.0, .min_chunk = 1024});
//   ep_plan eplb = eplb_plan(loads, /*ranks=*/8, /*redundant_per_rank=*/4);
//   ll.max_over_mean();  ll.foreign_weights();            // balance; (expert, rank) weight copies
//
// Invariants:
//   1. A plan covers every expert's rows [0, loads[e]) exactly once with chunks sorted by
//      (expert, begin); chunks of one expert are consecutive, each on one rank. Row order inside an
//      expert is the global one (source rank, then token, then k), so any plan computes each row
//      with the same weights as one rank would: outputs are exact whatever the plan.
//   2. Every chunk begins at a multiple of `row_align` (the expert FFN's row tile) — so a chunk's
//      rows are computed with the very sgemm calls a single rank makes for them (bitwise).
//   3. llep_plan follows the paper: gate (native per-rank max/mean <= lambda -> standard EP), capacity
//      m_alpha = alpha * sum(l) / P, experts in descending load (LPT; ties: lower id), native room first,
//      spills to the other ranks in ascending effective load (ties: lower rank), chunks < min_chunk
//      skipped unless they are the remainder, a remainder nobody has room for goes to the least
//      loaded rank. Deterministic: every rank computes the same plan from the same loads.
//   4. eplb_plan: the heaviest experts (by load / replicas) get the P * redundant_per_rank extra
//      slots, replicas are packed greedily (LPT) onto the least-loaded rank with a free slot that does
//      not hold that expert yet; an expert's rows are split evenly over its replicas (boundaries
//      rounded up to row_align, so a small expert may use fewer replicas). Its placement is
//      its own (replicas are resident, so `native` there is the first replica's rank).
//   5. eplb_plan_on keeps the given native placement and adds the redundant replicas on top: every
//      expert's first replica is its native one; the extra slots go to the heaviest experts as in
//      4 and are packed (LPT) onto the least-loaded rank, counting each rank's native experts at
//      load / replicas, with a free extra slot that does not hold the expert. This is what the
//      executor runs for ep_mode::eplb (the replicas stay resident there: ep_layer.h inv. 6).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace troupe::parallel::ep {

// Which rank owns each expert's weights (the native placement).
struct ep_placement {
  int ranks = 1;
  std::vector<int> native;  // expert -> rank

  // E/P consecutive experts per rank (expert e on rank e / (E/P)); E must be a multiple of P.
  static ep_placement contiguous(int64_t experts, int ranks);
  int64_t experts() const { return static_cast<int64_t>(native.size()); }
  std::vector<int> experts_of(int rank) const;  // ascending
  // Throws errc::invalid_argument naming the problem (rank out of range, a rank without experts
  // when `each_rank_owns` is true).
  void validate(bool each_rank_owns = false) const;
};

struct ep_chunk {
  int expert = 0;
  int rank = 0;
  int64_t begin = 0, end = 0;  // rows of the expert, [begin, end)
  int64_t rows() const { return end - begin; }
};

enum class ep_mode { standard, llep, eplb };
const char* ep_mode_name(ep_mode m);
ep_mode ep_mode_from(const std::string& name);  // "ep"/"standard", "llep", "eplb"; throws otherwise

struct llep_options {
  double lambda = 1.3;       // gate: plan only when native max/mean > lambda
  double alpha = 1.0;        // capacity m_alpha = alpha * total / P
  int64_t min_chunk = 1024;  // m: smaller spill chunks are skipped unless they are the remainder
  int64_t row_align = 1;     // chunk starts are multiples of this (the FFN row tile)
};

struct ep_plan {
  ep_mode mode = ep_mode::standard;
  bool gated = false;          // llep only: the gate chose standard EP
  ep_placement placement;      // whose weights each expert's chunks borrow (native owner)
  std::vector<ep_chunk> chunks;

  std::vector<int64_t> rank_rows() const;  // rows computed per rank
  double max_over_mean() const;            // of rank_rows (1 when nothing is routed)
  // Chunks on a rank that is not the expert's native one, counted once per (expert, rank): the weight
  // copies a step needs (llep: sent per step; eplb: resident replicas).
  std::vector<ep_chunk> foreign_weights() const;
  // The chunks rank `r` computes, in plan order.
  std::vector<ep_chunk> chunks_of(int r) const;
  // One line per chunk: "expert 5 rows [0, 2048) -> rank 3 (borrowed from rank 1)".
  std::string describe() const;
};

// Standard EP: each expert's rows on its native rank.
ep_plan ep_plan_standard(const std::vector<int64_t>& loads, const ep_placement& native);
ep_plan llep_plan(const std::vector<int64_t>& loads, const ep_placement& native, const llep_options& opt);
// `redundant_per_rank` extra expert slots on every rank; E must be a multiple of P.
ep_plan eplb_plan(const std::vector<int64_t>& loads, int ranks, int redundant_per_rank, int64_t row_align = 1);
ep_plan eplb_plan_on(const std::vector<int64_t>& loads, const ep_placement& native, int redundant_per_rank,
                     int64_t row_align = 1);
ep_plan make_ep_plan(ep_mode mode, const std::vector<int64_t>& loads, const ep_placement& native,
                     const llep_options& opt, int eplb_redundant_per_rank);

// Checks invariants 1 and 2 (coverage, order, ranks in range, alignment); throws errc::internal.
void ep_plan_check(const ep_plan& plan, const std::vector<int64_t>& loads, int64_t row_align);

// Max / mean of the per-rank load when every expert runs on its native rank.
double native_max_over_mean(const std::vector<int64_t>& loads, const ep_placement& native);

}  // namespace troupe::parallel::ep
