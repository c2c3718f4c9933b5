// parallel/train/optimizer.h — what turns gradients into a weight update: the learning-rate
// schedule (linear warmup, cosine decay), gradient clipping by the global L2 norm, and AdamW
// with weight decay on matrices only (the nanoGPT / Megatron split).
//
//   lr_schedule sched{.lr = 3e-3, .min_lr = 3e-4, .warmup = 20, .max_steps = 300};
//   adamw opt(weights, {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
//   double norm = clip_grad_norm(grads, /*max_norm=*/1.0);   // grads scaled in place
//   opt.step(weights, grads, sched.at(opt.steps()));          // opt.steps() counts from 0
//
// Invariants:
//   1. lr_schedule::at(s) for optimizer step s = 0, 1, ...: s < warmup: lr * (s + 1) / warmup;
//      else p = (s - warmup) / max(1, max_steps - warmup) (clamped to 1) and
//      min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2.
//   2. clip_grad_norm is torch.nn.utils.clip_grad_norm_: the norm is taken over every
//      gradient (accumulated in double), and every gradient is multiplied by
//      min(1, max_norm / (norm + 1e-6)). max_norm <= 0 only measures. Returns the norm before.
//   3. adamw::step is torch.optim.AdamW (foreach=False) with two groups: parameters with
//      ndim >= 2 decay by weight_decay, vectors (norms, biases) do not. Moments are f32 sets
//      with the weights' names and shapes (saved in checkpoints as exp_avg / exp_avg_sq).
//   4. Deterministic: elementwise and independent of the thread count.
//   5. Moments, weights or gradients registered on an emulated CXL tier (runtime/tier_registry.h)
//      make step() wait out their emulated access time (adamw_update_on_tiers); no bit changes.
#pragma once
#include <chrono>

#include "kernels/adamw.h"
#include <cstdint>

#include "parallel/model/model_weights.h"

namespace troupe::parallel {

struct lr_schedule {
  double lr = 1e-3;
  double min_lr = 0.0;
  int64_t warmup = 0;
  int64_t max_steps = 1;
  double at(int64_t step) const;
};

struct adamw_config {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// The L2 norm over every parameter of a gradient set (double accumulation).
double grad_global_norm(const model_weights& grads);
// The sum of squares of the gradients whose name passes `include` (nullptr: all); fixed chunks in
// order, so the same bits whatever the threads (an expert-parallel shard adds the ranks' expert parts).
double grad_sum_squares(const model_weights& grads, const std::function<bool(const std::string&)>& include = nullptr);
// grads scaled by min(1, max_norm / (norm + 1e-6)) when max_norm > 0, for a norm computed elsewhere.
void clip_grads_to(model_weights& grads, double norm, double max_norm);
// Scales every gradient in place.
void scale_grads(model_weights& grads, float factor);
// -> the norm before clipping; grads scaled by min(1, max_norm / (norm + 1e-6)) when max_norm > 0.
double clip_grad_norm(model_weights& grads, double max_norm);

// kernels::cpu::adamw_update over n elements in blocks of adamw_block elements; after each block
// the emulated tier time of its four arrays (runtime/tier_registry.h: zero unless a range is
// registered) is added to w.owed and the call waits until w.t_step + w.owed — or, with
// w.per_block, until the block's own start + its time. Cumulative waiting does not pay a late
// wake-up twice. Elementwise, so the result is bitwise one adamw_update's.
inline constexpr int64_t adamw_block = int64_t{1} << 18;
struct tier_wait {
  std::chrono::steady_clock::time_point t_step = std::chrono::steady_clock::now();
  double owed = 0;        // emulated seconds charged so far in this step
  bool per_block = false;
};
void adamw_update_on_tiers(float* w, const float* g, float* m, float* v, int64_t n, const kernels::adamw_params& hp,
                           int64_t step, tier_wait& wait);

class adamw {
 public:
  adamw(const model_weights& weights, adamw_config cfg);
  // One update of every parameter at learning rate lr; steps() then grows by one.
  void step(model_weights& weights, const model_weights& grads, double lr);
  int64_t steps() const { return steps_; }
  const adamw_config& config() const { return cfg_; }
  model_weights& exp_avg() { return m_; }
  model_weights& exp_avg_sq() { return v_; }
  const model_weights& exp_avg() const { return m_; }
  const model_weights& exp_avg_sq() const { return v_; }
  // Resumes from a checkpoint: moments with the weights' names and shapes (checked) and the step count.
  void restore(model_weights exp_avg, model_weights exp_avg_sq, int64_t steps);

 private:
  adamw_config cfg_;
  model_weights m_, v_;
  int64_t steps_ = 0;
};

}  // namespace troupe::parallel
