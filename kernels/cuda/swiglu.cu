// kernels/cuda/swiglu.cu — out = silu(gate) * up, elementwise on the device.
#include "kernels/cuda/common.cuh"
#include "kernels/swiglu.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// Stable for any g: expf never sees a large positive argument (as the cpu op).
__device__ __forceinline__ float sigmoid(float g) {
  if (g >= 0.0f) return 1.0f / (1.0f + expf(-g));
  const float e = expf(g);
  return e / (1.0f + e);
}

__global__ void swiglu_forward_kernel(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
  }
}
}  // namespace

// gate, up: (N, I)  ->  out: (N, I)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t I, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && I >= 0, errc::invalid_argument, "cuda::swiglu_forward: N={} I={} must be >= 0", N, I);
  const int64_t n = N * I;
  if (n == 0) return;
  swiglu_forward_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(out, gate, up, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
