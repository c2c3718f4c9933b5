// kernels/cpu/adamw.cpp — AdamW, following torch.optim.AdamW's single-tensor path op by op:
//   p *= 1 - lr*wd;  m.lerp_(g, 1-b1);  v = v*b2 + (1-b2)*g*g;
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  p += (-lr / (1 - b1^t)) * m / denom.
// Scalars are computed in double (as Python does) and applied in fp32 (as ATen does).
#include "kernels/adamw.h"

#include <cmath>

#include "runtime/error.h"

namespace troupe::kernels::cpu {

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const adamw_params& hp,
                  int64_t step) {
  using runtime::errc;
  TROUPE_CHECK(step >= 1, errc::invalid_argument, "adamw_update: step {} must count from 1", step);
  TROUPE_CHECK(hp.beta1 >= 0.0f && hp.beta1 < 1.0f && hp.beta2 >= 0.0f && hp.beta2 < 1.0f,
               errc::invalid_argument, "adamw_update: betas ({}, {}) must be in [0, 1)", hp.beta1, hp.beta2);
  const double lr = hp.lr, b1 = hp.beta1, b2 = hp.beta2;
  const double t = static_cast<double>(step);
  const float decay = static_cast<float>(1.0 - lr * static_cast<double>(hp.weight_decay));
  const float w1 = static_cast<float>(1.0 - b1);  // lerp weight
  const bool w1_small = std::fabs(w1) < 0.5f;
  const float b2f = hp.beta2;
  const float one_minus_b2 = static_cast<float>(1.0 - b2);
  const double bc1 = 1.0 - std::pow(b1, t);
  const double bc2 = 1.0 - std::pow(b2, t);
  const float neg_step_size = static_cast<float>(-(lr / bc1));
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float eps = hp.eps;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    float p = param[i] * decay;
    const float mi = m[i];
    // torch's lerp: small weight -> self + w (end - self); else end - (end - self)(1 - w)
    const float mn = w1_small ? mi + w1 * (g - mi) : g - (g - mi) * (1.0f - w1);
    const float vn = v[i] * b2f + one_minus_b2 * g * g;
    const float denom = std::sqrt(vn) / bc2_sqrt + eps;
    p = p + neg_step_size * mn / denom;
    m[i] = mn;
    v[i] = vn;
    param[i] = p;
  }
}

}  // namespace troupe::kernels::cpu
