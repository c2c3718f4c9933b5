// kernels/cuda/cuda_check.h — turn a failed CUDA runtime or cuBLAS call into a
// troupe::runtime::error(errc::cuda) that names the call, the error and file:line.
//
//   TROUPE_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
//   my_kernel<<<grid, block, 0, stream>>>(...);
//   TROUPE_CUDA_CHECK_LAUNCH();                    // launch-configuration errors
//   TROUPE_CUBLAS_CHECK(cublasSgemm(handle, ...));
//
// Invariants:
//   1. Never aborts: every failure throws, so a worker can report it and carry on.
//   2. Kernels are asynchronous; an error raised while a kernel runs surfaces at the
//      next checked call on the stream (usually the synchronize).
//   3. .cu files compile as C++17 (nvcc's default): fmt 9's consteval format strings do
//      not compile under nvcc -std=c++20, so .cu files include no C++20-only header
//      (runtime/error.h is fine; runtime/tensor.h and runtime/device.h are not).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "runtime/error.h"

#define TROUPE_CUDA_CHECK(call)                                                                         \
  do {                                                                                                  \
    const cudaError_t troupe_cuda_err_ = (call);                                                        \
    if (troupe_cuda_err_ != cudaSuccess)                                                                \
      throw ::troupe::runtime::error(::troupe::runtime::errc::cuda,                                     \
                                     ::fmt::format("{} failed: {} ({})", #call,                         \
                                                   cudaGetErrorString(troupe_cuda_err_),                \
                                                   cudaGetErrorName(troupe_cuda_err_)),                 \
                                     __FILE__, __LINE__);                                               \
  } while (0)

// After a <<<...>>> launch: catches a bad configuration (grid, block, shared memory).
#define TROUPE_CUDA_CHECK_LAUNCH() TROUPE_CUDA_CHECK(cudaGetLastError())

#define TROUPE_CUBLAS_CHECK(call)                                                                       \
  do {                                                                                                  \
    const cublasStatus_t troupe_cublas_st_ = (call);                                                    \
    if (troupe_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                                     \
      throw ::troupe::runtime::error(::troupe::runtime::errc::cuda,                                     \
                                     ::fmt::format("{} failed: {} (status {})", #call,                  \
                                                   cublasGetStatusString(troupe_cublas_st_),            \
                                                   static_cast<int>(troupe_cublas_st_)),                \
                                     __FILE__, __LINE__);                                               \
  } while (0)
