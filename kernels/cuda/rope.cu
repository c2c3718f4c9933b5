// kernels/cuda/rope.cu — the RoPE rotation on the device (HF rotate_half pairs).
#include "kernels/cuda/common.cuh"
#include "kernels/rope.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// One thread per (b, t, h, j), j < half + (HD - rotary_dim): j < half rotates the pair
// (j, j + half) (so out may alias inp), the rest copies dim rotary_dim + (j - half).
__global__ void rope_forward_kernel(float* out, const float* inp, const float* cos, const float* sin, int64_t T,
                                    int64_t NH, int64_t HD, int64_t half, int64_t rows) {
  const int64_t per_row = HD - half;  // half pairs + (HD - 2 half) pass-through dims
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / per_row, j = i - row * per_row;  // row = (b * T + t) * NH + h
    const int64_t t = (row / NH) % T;
    const float* x = inp + row * HD;
    float* y = out + row * HD;
    if (j < half) {
      const float c = cos[t * half + j], s = sin[t * half + j];
      const float x0 = x[j], x1 = x[j + half];
      y[j] = x0 * c - x1 * s;
      y[j + half] = x1 * c + x0 * s;
    } else {
      const int64_t d = 2 * half + (j - half);
      y[d] = x[d];
    }
  }
}
}  // namespace

// inp: (B, T, NH, HD)  cos, sin: (T, rotary_dim/2)  ->  out: (B, T, NH, HD); out may alias inp.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t NH, int64_t HD, int64_t rotary_dim, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= HD, errc::invalid_argument,
               "cuda::rope_forward: rotary_dim {} must be even and in (0, head_dim {}]", rotary_dim, HD);
  TROUPE_CHECK(B >= 0 && T >= 0 && NH > 0, errc::invalid_argument, "cuda::rope_forward: B={} T={} NH={}", B, T, NH);
  const int64_t rows = B * T * NH;
  if (rows == 0) return;
  const int64_t half = rotary_dim / 2;
  rope_forward_kernel<<<grid_for(rows * (HD - half), 256), 256, 0, as_stream(stream)>>>(out, inp, cos, sin, T, NH,
                                                                                          HD, half, rows);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
