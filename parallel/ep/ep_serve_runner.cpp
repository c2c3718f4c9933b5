// parallel/ep/ep_serve_runner.cpp — see ep_serve_runner.h.
#include "parallel/ep/ep_serve_runner.h"

#include <algorithm>
#include <cstring>

#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;
using runtime::tensor;

ep_serve_runner::ep_serve_runner(ep_context group, ep_serve_layout layout) : comm_(group.tokens), layout_(layout) {
  TROUPE_CHECK(comm_ != nullptr, errc::invalid_argument, "serving MoE runner: a group without a token communicator");
  ep_ = std::make_unique<ep_moe_runner>(std::move(group));
}

int ep_serve_runner::ranks() const { return comm_ ? comm_->size() : 1; }

void ep_serve_runner::forward(int64_t layer, float* out, const float* x, const layer_params& L, const model_config& c,
                              int64_t N) {
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k;
  std::vector<int64_t> add(static_cast<size_t>(E), 0);
  if (!ep_) {
    moe_forward(out, local_, x, L, c, N);
    const int32_t* idx = local_.topk_idx.data<int32_t>();
    for (int64_t i = 0; i < N * K; ++i) ++add[static_cast<size_t>(idx[i])];
  } else if (layout_ == ep_serve_layout::data_parallel) {
    // Every rank joins the layer's exchanges, with N = 0 rows too (invariant 1); a rank without rows
    // passes a valid one-element buffer, which the layer never reads or writes.
    float no_rows_out[1] = {0};
    const float no_rows_x[1] = {0};
    ep_->forward(layer, N > 0 ? out : no_rows_out, N > 0 ? x : no_rows_x, L, c, N);
    const auto& st = ep_->layer_stats(layer);
    for (int64_t e = 0; e < E && e < static_cast<int64_t>(st.loads.size()); ++e)
      add[static_cast<size_t>(e)] = st.loads[static_cast<size_t>(e)];
    ep_->release();
  } else {
    const int64_t P = comm_->size(), r = comm_->rank();
    const int64_t S = (N + P - 1) / P;
    const int64_t lo = std::min(N, r * S), hi = std::min(N, lo + S), n = hi - lo;
    slice_out_.assign(static_cast<size_t>(std::max<int64_t>(n, 1) * C), 0.f);
    ep_->forward(layer, slice_out_.data(), x + lo * C, L, c, n);  // every rank, even with n = 0
    tensor mine = tensor::zeros({S, C});
    if (n > 0) std::memcpy(mine.data<float>(), slice_out_.data(), static_cast<size_t>(n * C) * sizeof(float));
    tensor all = tensor::empty({P * S, C});
    comm_->all_gather(all, mine);
    std::memcpy(out, all.data<float>(), static_cast<size_t>(N * C) * sizeof(float));
    const auto& st = ep_->layer_stats(layer);
    for (int64_t e = 0; e < E && e < static_cast<int64_t>(st.loads.size()); ++e)
      add[static_cast<size_t>(e)] = st.loads[static_cast<size_t>(e)];
    ep_->release();  // forward only: no layer's activations are kept for a backward
  }
  std::lock_guard<std::mutex> g(mu_);
  auto& l = loads_[layer];
  if (l.empty()) l.assign(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) l[static_cast<size_t>(e)] += add[static_cast<size_t>(e)];
  last_[layer] = add;
  if (ep_) last_mom_ = ep_->step_max_over_mean();
}

void ep_serve_runner::backward(int64_t layer, float*, layer_params&, const float*, const float*, const layer_params&,
                               const model_config&, int64_t) {
  TROUPE_CHECK(false, errc::unsupported,
               "serving MoE runner: backward of MoE layer {}: serving runs forward only (train with ep_moe_runner)",
               layer);
}

std::map<int64_t, std::vector<int64_t>> ep_serve_runner::expert_loads() const {
  std::lock_guard<std::mutex> g(mu_);
  return loads_;
}

std::map<int64_t, std::vector<int64_t>> ep_serve_runner::last_loads() const {
  std::lock_guard<std::mutex> g(mu_);
  return last_;
}

double ep_serve_runner::last_max_over_mean() const {
  std::lock_guard<std::mutex> g(mu_);
  return last_mom_;
}

}  // namespace troupe::parallel::ep
