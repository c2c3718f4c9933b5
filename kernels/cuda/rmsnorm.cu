// kernels/cuda/rmsnorm.cu — RMSNorm on the device: one block per row, the sum of
// squares reduced with warp shuffles.
#include "kernels/cuda/common.cuh"
#include "kernels/rmsnorm.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// x: (N, C)  w: (C)  ->  out: (N, C), rstd: (N) nullable. out may alias x: each thread
// reads x[c] before it writes out[c], for the same c.
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* w, int64_t C,
                                       float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * C;
  float* o = out + row * C;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = xr[c];
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(C) + eps);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = w[c] * (xr[c] * r);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
}
}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C, float eps,
                     void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && C > 0, errc::invalid_argument, "cuda::rmsnorm_forward: need N >= 0 and C > 0, got N={} C={}",
               N, C);
  TROUPE_CHECK(N <= 0x7fffffff, errc::invalid_argument, "cuda::rmsnorm_forward: N={} rows exceed the grid", N);
  if (N == 0) return;
  const int threads = C >= 1024 ? 256 : (C >= 256 ? 128 : 64);
  rmsnorm_forward_kernel<<<static_cast<unsigned>(N), threads, 0, as_stream(stream)>>>(out, rstd, x, w, C, eps);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
