// kernels/cuda/matmul.cu — the linear layer on the device: cuBLAS sgemm (fp32, no TF32)
// with a per-thread, per-device cached handle, then a bias-add kernel.
#include <climits>
#include <unordered_map>

#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

// One handle per (thread, device), bound to the caller's stream on every use. Handles
// are never destroyed: at thread/process exit the CUDA context may already be gone.
cublasHandle_t cublas_handle(cudaStream_t stream) {
  int dev = 0;
  TROUPE_CUDA_CHECK(cudaGetDevice(&dev));
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  cublasHandle_t& h = handles[dev];
  if (h == nullptr) {
    TROUPE_CUBLAS_CHECK(cublasCreate(&h));
    // Plain fp32 math: TF32 tensor cores would break parity with the cpu op (1e-4).
    TROUPE_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  }
  TROUPE_CUBLAS_CHECK(cublasSetStream(h, stream));
  return h;
}

__global__ void add_bias_kernel(float* out, const float* bias, int64_t N, int64_t OC) {
  const int64_t total = N * OC;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x)
    out[i] += bias[i % OC];
}
}  // namespace

// inp: (N, C)  weight: (OC, C)  bias: (OC) nullable  ->  out: (N, OC)
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && C >= 0 && OC >= 0 && N <= INT_MAX && C <= INT_MAX && OC <= INT_MAX,
               errc::invalid_argument, "cuda::matmul_forward: sizes N={} C={} OC={} must be in [0, 2^31)", N, C, OC);
  if (N == 0 || OC == 0) return;
  cudaStream_t s = as_stream(stream);
  if (C == 0) {
    TROUPE_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<size_t>(N * OC) * sizeof(float), s));
  } else {
    // Row-major out (N, OC) is column-major out^T (OC, N) = W (OC, C) · inp^T (C, N);
    // W row-major is column-major (C, OC), hence op T; inp row-major is column-major (C, N).
    const float one = 1.0f, zero = 0.0f;
    TROUPE_CUBLAS_CHECK(cublasSgemm(cublas_handle(s), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(OC),
                                    static_cast<int>(N), static_cast<int>(C), &one, weight, static_cast<int>(C), inp,
                                    static_cast<int>(C), &zero, out, static_cast<int>(OC)));
  }
  if (bias != nullptr) {
    add_bias_kernel<<<grid_for(N * OC, 256), 256, 0, s>>>(out, bias, N, OC);
    TROUPE_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace troupe::kernels::cuda
