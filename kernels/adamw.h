// kernels/adamw.h — AdamW with decoupled weight decay (torch.optim.AdamW semantics).
//
//   adamw_params hp{.lr = 3e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
//   cpu::adamw_update(param, grad, m, v, n, hp, /*step=*/1);   // step counts from 1
//
// Invariants:
//   1. param -= lr * wd * param; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//      param -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (torch order).
//   2. Multithreaded with OpenMP; elementwise, so the result does not depend on threads.
#pragma once
#include <cstdint>

namespace troupe::kernels {

struct adamw_params {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
};

namespace cpu {
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const adamw_params& hp,
                  int64_t step);
}  // namespace cpu
namespace cuda {
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const adamw_params& hp,
                  int64_t step, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
