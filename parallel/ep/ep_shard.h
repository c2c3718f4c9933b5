// parallel/ep/ep_shard.h — a model's parameters split by expert ownership (expert parallelism in
// training): every rank holds the non-expert parameters and its native experts only.
//
//   ep_shard_weights(w, placement, rank);                  // release the experts owned elsewhere
//   model_weights g = model_weights::zeros_like(w);         // gradients / moments mirror the shard
//   model_weights full = ep_gather_weights(w, [&](tensor& t) { comm.all_reduce(t, reduce_op::sum); });
//   ep_is_expert_param("model.layers.0.block_sparse_moe.experts.3.w1.weight");   // true
//
// Invariants:
//   1. A shard is a model_weights whose non-native expert tensors are undefined
//      (model_weights.h invariant 5); parameters() lists what the rank holds, in the usual order.
//   2. ep_gather_weights is collective (every rank calls it, with its shard of the same config and
//      the same placement): one sum per MoE layer of a buffer in which only each expert's owner
//      wrote it, so the result is exact (x + 0 = x) and the same on every rank. An expert held by
//      no rank or by two throws errc::internal naming it. Non-expert parameters are the rank's own.
#pragma once
#include <functional>
#include <string>

#include "parallel/ep/ep_plan.h"
#include "parallel/model/model_weights.h"

namespace troupe::parallel::ep {

bool ep_is_expert_param(const std::string& name);
void ep_shard_weights(model_weights& w, const ep_placement& placement, int rank);
model_weights ep_gather_weights(const model_weights& shard, const std::function<void(runtime::tensor&)>& all_reduce_sum);

}  // namespace troupe::parallel::ep
