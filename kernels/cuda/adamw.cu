// kernels/cuda/adamw.cu — AdamW on the device, the same arithmetic as kernels/cpu/adamw.cpp
// (torch's single-tensor path: scalars in double on the host, applied in fp32).
#include <cmath>

#include "kernels/adamw.h"
#include "kernels/cuda/common.cuh"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

struct adamw_scalars {
  float decay, w1, b2, one_minus_b2, neg_step_size, bc2_sqrt, eps;
  bool w1_small;
};

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, adamw_scalars s) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = grad[i];
    float p = param[i] * s.decay;
    const float mi = m[i];
    const float mn = s.w1_small ? mi + s.w1 * (g - mi) : g - (g - mi) * (1.0f - s.w1);  // torch's lerp
    const float vn = v[i] * s.b2 + s.one_minus_b2 * g * g;
    const float denom = sqrtf(vn) / s.bc2_sqrt + s.eps;
    p = p + s.neg_step_size * mn / denom;
    m[i] = mn;
    v[i] = vn;
    param[i] = p;
  }
}
}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const adamw_params& hp,
                  int64_t step, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(step >= 1, errc::invalid_argument, "cuda::adamw_update: step {} must count from 1", step);
  TROUPE_CHECK(hp.beta1 >= 0.0f && hp.beta1 < 1.0f && hp.beta2 >= 0.0f && hp.beta2 < 1.0f, errc::invalid_argument,
               "cuda::adamw_update: betas ({}, {}) must be in [0, 1)", hp.beta1, hp.beta2);
  TROUPE_CHECK(n >= 0, errc::invalid_argument, "cuda::adamw_update: n={} must be >= 0", n);
  if (n == 0) return;
  const double lr = hp.lr, b1 = hp.beta1, b2 = hp.beta2, t = static_cast<double>(step);
  adamw_scalars s;
  s.decay = static_cast<float>(1.0 - lr * static_cast<double>(hp.weight_decay));
  s.w1 = static_cast<float>(1.0 - b1);
  s.w1_small = std::fabs(s.w1) < 0.5f;
  s.b2 = hp.beta2;
  s.one_minus_b2 = static_cast<float>(1.0 - b2);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(b1, t))));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, t)));
  s.eps = hp.eps;
  adamw_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(param, grad, m, v, n, s);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
