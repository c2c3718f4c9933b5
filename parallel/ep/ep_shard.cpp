// parallel/ep/ep_shard.cpp — see ep_shard.h.
#include "parallel/ep/ep_shard.h"

#include <cstring>
#include <map>

#include "parallel/ep/ep_layer.h"
#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;
using runtime::tensor;

bool ep_is_expert_param(const std::string& name) { return name.find(".experts.") != std::string::npos; }

void ep_shard_weights(model_weights& w, const ep_placement& placement, int rank) {
  for (auto& L : w.layers)
    if (L.is_moe) ep_shard_layer(L, placement, rank);
}

model_weights ep_gather_weights(const model_weights& shard,
                                const std::function<void(tensor&)>& all_reduce_sum) {
  model_weights full = model_weights::allocate(shard.config());
  // Non-expert parameters (and this rank's experts) by name.
  std::map<std::string, tensor> held;
  for (const auto& [name, t] : shard.parameters()) held.emplace(name, t);
  for (auto& p : full.parameters()) {
    auto it = held.find(p.name);
    if (it != held.end()) std::memcpy(p.value.data_ptr(), it->second.data_ptr(), p.value.nbytes());
  }
  for (size_t l = 0; l < full.layers.size(); ++l) {
    const layer_params& S = shard.layers[l];
    layer_params& F = full.layers[l];
    if (!F.is_moe) continue;
    const int64_t E = static_cast<int64_t>(F.expert_gate.size());
    const int64_t per = F.expert_gate[0].numel() + F.expert_up[0].numel() + F.expert_down[0].numel();
    tensor buf = tensor::zeros({E * per});
    tensor owners = tensor::zeros({E}, runtime::dtype::i32);
    for (int64_t e = 0; e < E; ++e) {
      if (!S.expert_gate[static_cast<size_t>(e)].defined()) continue;
      float* dst = buf.data<float>() + e * per;
      for (const tensor* t : {&S.expert_gate[static_cast<size_t>(e)], &S.expert_up[static_cast<size_t>(e)],
                              &S.expert_down[static_cast<size_t>(e)]}) {
        std::memcpy(dst, t->data_ptr(), t->nbytes());
        dst += t->numel();
      }
      owners.data<int32_t>()[e] = 1;
    }
    all_reduce_sum(buf);
    all_reduce_sum(owners);
    for (int64_t e = 0; e < E; ++e) {
      const int32_t n = owners.data<int32_t>()[e];
      TROUPE_CHECK(n == 1, errc::internal, "ep_gather_weights: expert {} of layer {} is held by {} ranks, not one", e,
                   l, n);
      const float* src = buf.data<float>() + e * per;
      for (tensor* t : {&F.expert_gate[static_cast<size_t>(e)], &F.expert_up[static_cast<size_t>(e)],
                        &F.expert_down[static_cast<size_t>(e)]}) {
        std::memcpy(t->data_ptr(), src, t->nbytes());
        src += t->numel();
      }
    }
  }
  return full;
}

}  // namespace troupe::parallel::ep
