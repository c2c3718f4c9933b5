// parallel/ep/ep_serve_runner.h — the MoE layers of a serving step, on one rank or across an
// expert-parallel group, in one of two layouts:
//   * replicated: every rank runs the same batch (the same new tokens, the attention and a replica
//     of the paged KV cache); in each MoE layer rank r takes the r-th contiguous slice of the batch's
//     rows through the expert-parallel layer and the slices' outputs are all-gathered, so every rank
//     leaves the layer with every row;
//   * data_parallel (DP attention): every rank runs its own requests' tokens (its own attention and
//     KV cache); in each MoE layer its rows go to their experts' ranks through the expert-parallel
//     layer and come back, so every rank leaves the layer with its own rows.
// The layer is ep_layer.h's (LLEP by default, so a hot expert's rows spill to idle ranks with its
// weights). It also counts each layer's rows per expert.
//
//   ep_context ctx{.tokens = comm, .weights = comm2, .placement = ep_placement::contiguous(E, P)};
//   ep_serve_runner moe(std::move(ctx));        // replicated; or ep_serve_runner moe;  (one rank)
//   ep_serve_runner dp(std::move(ctx), ep_serve_layout::data_parallel);
//   dec.set_expert_parallel(&moe);              // forward_batch's MoE layers now run through it
//   moe.expert_loads();                         // {layer: rows per expert since the start}
//
// Invariants:
//   1. Replicated: with N rows and P ranks, rank r's slice is rows [r*S, min(N, (r+1)*S)), S =
//      ceil(N/P). A slice may be empty (one decode token on two ranks): that rank still takes part in
//      every collective of the layer, so the group never waits on it. Data parallel: every rank calls
//      every MoE layer in every group iteration with its own N rows, N = 0 included
//      (parallel/model/forward_batch.h forward_batch_idle), and the batch the layer stands for is the
//      ranks' rows concatenated in rank order.
//   2. The slices concatenated are the batch in order, so the output equals moe_forward on the whole
//      batch on one rank bitwise for a model without a shared expert (ep_layer.h: standard EP = the
//      single-rank layer on the concatenated batch; LLEP and EPLB = standard EP), and within 1e-6
//      with one (its dense MLP is not batch invariant): greedy serving on P ranks = on one.
//   3. expert_loads() are the whole group's rows per expert (top-k rows of every token of the batch,
//      of every rank's tokens in data_parallel), per MoE layer, summed over every forward since
//      construction; it may be called from any thread while forwards run. Every rank of a group
//      counts the same numbers.
//   4. Forward only: backward throws errc::unsupported (training uses ep_moe_runner directly).
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "parallel/ep/ep_runner.h"

namespace troupe::parallel::ep {

enum class ep_serve_layout { replicated, data_parallel };

class ep_serve_runner final : public moe_runner {
 public:
  ep_serve_runner() = default;  // one rank: moe_forward plus the counting
  // a group: ctx.tokens must be set
  explicit ep_serve_runner(ep_context group, ep_serve_layout layout = ep_serve_layout::replicated);

  void forward(int64_t layer, float* out, const float* x, const layer_params& L, const model_config& c,
               int64_t N) override;
  void backward(int64_t layer, float* dx, layer_params& G, const float* dout, const float* x, const layer_params& L,
                const model_config& c, int64_t N) override;

  int ranks() const;
  ep_serve_layout layout() const { return layout_; }
  // The group's expert-parallel layer (placements, last plans); null on one rank.
  ep_moe_runner* group() { return ep_.get(); }
  std::map<int64_t, std::vector<int64_t>> expert_loads() const;
  // The group's rows per expert of each MoE layer's last forward (what a step reports).
  std::map<int64_t, std::vector<int64_t>> last_loads() const;
  // Max/mean rows per rank of the last forward's plans over the MoE layers (1 on one rank).
  double last_max_over_mean() const;

 private:
  std::unique_ptr<ep_moe_runner> ep_;
  runtime::communicator* comm_ = nullptr;
  ep_serve_layout layout_ = ep_serve_layout::replicated;
  moe_activations local_;
  std::vector<float> slice_out_;
  mutable std::mutex mu_;
  std::map<int64_t, std::vector<int64_t>> loads_, last_;
  double last_mom_ = 1.0;
};

}  // namespace troupe::parallel::ep
