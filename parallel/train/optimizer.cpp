// parallel/train/optimizer.cpp — lr schedule, gradient clipping, AdamW over a model_weights set.
#include "parallel/train/optimizer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "kernels/adamw.h"
#include "runtime/error.h"
#include "runtime/tier_registry.h"

namespace troupe::parallel {

using runtime::errc;

double lr_schedule::at(int64_t step) const {
  if (warmup > 0 && step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, max_steps - warmup));
  const double p = std::min(1.0, static_cast<double>(step - warmup) / span);
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * p));
}

double grad_global_norm(const model_weights& grads) { return std::sqrt(grad_sum_squares(grads)); }

double grad_sum_squares(const model_weights& grads, const std::function<bool(const std::string&)>& include) {
  // Fixed chunks summed in order: the same bits whatever the thread count or schedule.
  constexpr int64_t chunk = 1 << 15;
  double sum = 0.0;
  std::vector<double> partial;
  for (const auto& [name, t] : grads.parameters()) {
    if (include && !include(name)) continue;
    const float* p = t.data<float>();
    const int64_t n = t.numel();
    const int64_t chunks = (n + chunk - 1) / chunk;
    partial.assign(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      double s = 0.0;
      for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i)
        s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
      partial[static_cast<size_t>(c)] = s;
    }
    for (double s : partial) sum += s;
  }
  return sum;
}

void scale_grads(model_weights& grads, float factor) {
  for (auto& p : grads.parameters()) {
    float* d = p.value.data<float>();
    const int64_t n = p.value.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) d[i] *= factor;
  }
}

double clip_grad_norm(model_weights& grads, double max_norm) {
  const double norm = grad_global_norm(grads);
  clip_grads_to(grads, norm, max_norm);
  return norm;
}

void clip_grads_to(model_weights& grads, double norm, double max_norm) {
  if (max_norm > 0) {
    const double coef = std::min(1.0, max_norm / (norm + 1e-6));
    if (coef < 1.0) scale_grads(grads, static_cast<float>(coef));
  }
}

adamw::adamw(const model_weights& weights, adamw_config cfg)
    : cfg_(cfg), m_(model_weights::zeros_like(weights)), v_(model_weights::zeros_like(weights)) {
  TROUPE_CHECK(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1 && cfg.eps > 0 &&
                   cfg.weight_decay >= 0,
               errc::invalid_argument, "adamw: betas must be in [0, 1), eps > 0, weight_decay >= 0 (got {}, {}, {}, {})",
               cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
}

void adamw::step(model_weights& weights, const model_weights& grads, double lr) {
  auto w = weights.parameters();
  const auto g = grads.parameters();
  auto m = m_.parameters();
  auto v = v_.parameters();
  TROUPE_CHECK(w.size() == g.size() && w.size() == m.size(), errc::invalid_argument,
               "adamw: {} weights but {} gradients and {} moments", w.size(), g.size(), m.size());
  ++steps_;
  tier_wait wait;  // the step's emulated tier time, waited out cumulatively
  for (size_t i = 0; i < w.size(); ++i) {
    TROUPE_CHECK(w[i].value.numel() == g[i].second.numel(), errc::invalid_argument,
                 "adamw: gradient of {} has {} elements, the weight {}", w[i].name, g[i].second.numel(),
                 w[i].value.numel());
    kernels::adamw_params hp;
    hp.lr = static_cast<float>(lr);
    hp.beta1 = static_cast<float>(cfg_.beta1);
    hp.beta2 = static_cast<float>(cfg_.beta2);
    hp.eps = static_cast<float>(cfg_.eps);
    hp.weight_decay = w[i].value.ndim() >= 2 ? static_cast<float>(cfg_.weight_decay) : 0.0f;
    adamw_update_on_tiers(w[i].value.data<float>(), g[i].second.data<float>(), m[i].value.data<float>(),
                          v[i].value.data<float>(), w[i].value.numel(), hp, steps_, wait);
  }
}

void adamw_update_on_tiers(float* w, const float* g, float* m, float* v, int64_t n, const kernels::adamw_params& hp,
                           int64_t step, tier_wait& wait) {
  for (int64_t off = 0; off < n; off += adamw_block) {
    const int64_t len = std::min(adamw_block, n - off);
    const auto t0 = std::chrono::steady_clock::now();
    kernels::cpu::adamw_update(w + off, g + off, m + off, v + off, len, hp, step);
    const size_t bytes = static_cast<size_t>(len) * sizeof(float);
    const auto cost = [bytes](const void* p) { return runtime::emulated_seconds(p, bytes); };
    const double block = cost(w + off) + cost(g + off) + cost(m + off) + cost(v + off);
    wait.owed += block;
    if (wait.per_block)
      runtime::emulate_access(t0, block);
    else
      runtime::emulate_access(wait.t_step, wait.owed);
  }
}

void adamw::restore(model_weights exp_avg, model_weights exp_avg_sq, int64_t steps) {
  const auto want = m_.parameters();
  for (const model_weights* set : {&exp_avg, &exp_avg_sq}) {
    const auto got = set->parameters();
    TROUPE_CHECK(got.size() == want.size(), errc::format, "adamw: the saved moments hold {} tensors, the model {}",
                 got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      TROUPE_CHECK(got[i].first == want[i].name && got[i].second.shape() == want[i].value.shape(), errc::format,
                   "adamw: saved moment {} {} does not match the model's {} {}", got[i].first,
                   got[i].second.describe(), want[i].name, want[i].value.describe());
  }
  TROUPE_CHECK(steps >= 0, errc::format, "adamw: saved step count {} < 0", steps);
  m_ = std::move(exp_avg);
  v_ = std::move(exp_avg_sq);
  steps_ = steps;
}

}  // namespace troupe::parallel
