// parallel/ep/ep_layer.h — the MoE layer across an expert-parallel group: router -> permute ->
// counts exchange -> plan (standard EP, LLEP or EPLB; ep_plan.h) -> all_to_all_v dispatch ->
// grouped expert FFN on each rank's chunks (borrowed weights arrive point-to-point, overlapped with
// the dispatch) -> all_to_all_v combine -> unpermute; backward mirrors it and returns the weight
// gradients of borrowed experts to their native rank.
//
//   ep_context ctx{.tokens = comm, .weights = comm2 /*optional: overlap*/,
//                  .placement = ep_placement::contiguous(E, comm->size()), .options = {.mode = ep_mode::llep}};
//   ep_activations a;
//   ep_moe_forward(out, a, x, L, cfg, N, ctx);            // L holds this rank's native experts only
//   ep_moe_backward(dx, G, dout, a, x, L, cfg, N, ctx);   // G's native expert grads +=
//   ctx.last.loads;  ctx.last.plan.describe();            // what the step did
//
// Invariants:
//   1. Every rank of `tokens` calls forward/backward together with its own N tokens (N may differ);
//      the batch they stand for is the concatenation of the ranks' tokens in rank order.
//   2. Exact: outputs, dx and every expert's weight gradient equal the single-rank MoE layer
//      (parallel/model/moe_block.h) on that concatenated batch, bitwise, for standard EP and for any
//      plan that does not split an expert. An expert split over ranks (LLEP/EPLB) has the same
//      outputs and dx bitwise (its rows are computed with the same sgemm tiles, ep_plan.h inv. 2);
//      its weight gradient is the sum of per-rank partial sums, equal to the single rank's within
//      fp32 rounding of that re-association (tests bound it at 1e-6 relative, norm-wise). Router and
//      shared-expert gradients are this rank's tokens' only (data-parallel; grad_sync sums them).
//   3. L (and G) hold tensors only for this rank's native experts under ctx.placement; borrowed
//      weights live in the activations until backward and are then dropped.
//   4. Point-to-point transfers happen in one global order (expert, then destination rank), so they
//      cannot deadlock on a blocking backend; with ctx.weights they run on their own thread and
//      communicator while the token all_to_all_v runs.
//   5. Every rank logs its plan at debug level (expert, row range, rank).
//   6. EPLB's replicas are resident: a replica's weights are fetched once and kept in the context
//      (ep_context::replicas) for as long as the plan keeps it and the weights do not change
//      (drop_replicas(): the trainer calls it after every optimizer step). LLEP's borrowed weights
//      travel every step, as in the paper.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "parallel/ep/ep_plan.h"
#include "parallel/model/moe_block.h"
#include "runtime/communicator.h"

namespace troupe::parallel::ep {

struct ep_options {
  ep_mode mode = ep_mode::llep;
  llep_options llep;              // row_align is set to the expert FFN's row tile
  int eplb_redundant_per_rank = 1;
};

// What the last forward did (for metrics, the supervisor and benchmarks).
struct ep_step_stats {
  std::vector<int64_t> loads;   // rows per expert, whole group
  ep_plan plan;
  size_t weight_bytes_sent = 0, weight_bytes_received = 0;  // this rank, forward + backward
  size_t weights_fetched = 0;   // of which expert weights received in forward (not resident yet)
  size_t token_bytes_sent = 0;
  int64_t rows_computed = 0;    // rows this rank's FFN ran
};

struct ep_context {
  runtime::communicator* tokens = nullptr;   // dispatch/combine and the counts exchange
  runtime::communicator* weights = nullptr;  // optional second communicator over the same ranks
  ep_placement placement;
  ep_options options;
  ep_step_stats last;
  // EPLB (invariant 6): the replicas this rank keeps (expert -> {gate, up, down}) and the
  // (expert, rank) pairs that hold one, the same set on every rank.
  std::map<int, std::vector<runtime::tensor>> replicas;
  std::set<std::pair<int, int>> replica_pairs;
  void drop_replicas() {
    replicas.clear();
    replica_pairs.clear();
  }
};

struct ep_activations {
  moe_activations local;                 // router, top-k and the permute plan of this rank's tokens
  std::vector<int64_t> counts;           // (P, E): rows of expert e on source rank p
  ep_plan plan;
  // The rows this rank computes, chunk after chunk (plan.chunks_of(rank) order).
  runtime::tensor xp, h_gate, h_up;      // (R, C), (R, Im), (R, Im)
  std::vector<int32_t> chunk_offsets;    // (chunks + 1) rows into xp
  std::map<int, std::vector<runtime::tensor>> borrowed;  // expert -> {gate, up, down}
};

// The FFN's row tile: expert rows are computed in tiles of this many rows from the expert's row 0.
int64_t ep_row_tile();

// x: (N, C)  ->  out: (N, C) =
void ep_moe_forward(float* out, ep_activations& a, const float* x, const layer_params& L, const model_config& c,
                    int64_t N, ep_context& ctx);
// dout: (N, C)  ->  dx: (N, C) =, G's router/shared/native expert tensors +=
void ep_moe_backward(float* dx, layer_params& G, const float* dout, ep_activations& a, const float* x,
                     const layer_params& L, const model_config& c, int64_t N, ep_context& ctx);

// Moves expert tensors from one native placement to another over `comm` (every rank calls it):
// each set is E tensors of one shape (L.expert_gate, optimizer moments ...); an expert whose rank
// changes is sent by its old owner (whose tensor is then released) and allocated and received by
// the new one. Returns the bytes this rank sent.
struct ep_expert_tensors {
  std::vector<runtime::tensor>* tensors;
  runtime::shape_t shape;
};
size_t ep_migrate(const std::vector<ep_expert_tensors>& sets, const ep_placement& from, const ep_placement& to,
                  runtime::communicator& comm);
// The sets of an MoE layer's expert weights: gate, up, down.
std::vector<ep_expert_tensors> ep_expert_sets(layer_params& L, const model_config& c);

// Keeps only `rank`'s native experts in L (others released): a full layer -> this rank's shard.
void ep_shard_layer(layer_params& L, const ep_placement& placement, int rank);

}  // namespace troupe::parallel::ep
