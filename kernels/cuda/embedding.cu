// kernels/cuda/embedding.cu — token embedding lookup on the device.
#include "kernels/cuda/common.cuh"
#include "kernels/embedding.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// One thread per output element (grid-stride).
__global__ void embedding_forward_kernel(float* out, const int32_t* ids, const float* wte, int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = i / C, c = i - n * C;
    out[i] = wte[static_cast<int64_t>(ids[n]) * C + c];
  }
}
}  // namespace

// ids: (N)  wte: (V, C)  ->  out: (N, C); ids must be range-checked on the host.
void embedding_forward(float* out, const int32_t* ids, const float* wte, int64_t N, int64_t C, int64_t V,
                       void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && C > 0 && V > 0, errc::invalid_argument,
               "cuda::embedding_forward: need N >= 0, C > 0, V > 0; got N={} C={} V={}", N, C, V);
  if (N == 0) return;
  embedding_forward_kernel<<<grid_for(N * C, 256), 256, 0, as_stream(stream)>>>(out, ids, wte, N, C);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
