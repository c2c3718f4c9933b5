// kernels/cuda/cross_entropy.cu — per-token cross-entropy from given logits: one block
// per row, a stable log-sum-exp (max, then sum of exp(x - max)) reduced in the block.
#include "kernels/cross_entropy.h"
#include "kernels/cuda/common.cuh"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// logits: (N, V)  targets: (N)  ->  losses: (N). target < 0: loss 0; target >= V: NaN
// (the device cannot throw; the host checks targets first, see the header).
__global__ void cross_entropy_forward_kernel(float* losses, const float* logits, const int32_t* targets, int64_t V) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int32_t target = targets[row];
  if (target < 0) {  // uniform across the block
    if (threadIdx.x == 0) losses[row] = 0.0f;
    return;
  }
  const float* x = logits + row * V;
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = block_max(mx, scratch);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) sum += expf(x[i] - mx);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) losses[row] = target < V ? logf(sum) + mx - x[target] : NAN;
}
}  // namespace

void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                           void* stream) {
  using runtime::errc;
  TROUPE_CHECK(V > 0 && N >= 0, errc::invalid_argument, "cuda::cross_entropy_forward: N={} V={}", N, V);
  TROUPE_CHECK(N <= 0x7fffffff, errc::invalid_argument, "cuda::cross_entropy_forward: N={} rows exceed the grid", N);
  if (N == 0) return;
  cross_entropy_forward_kernel<<<static_cast<unsigned>(N), 256, 0, as_stream(stream)>>>(losses, logits, targets, V);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
