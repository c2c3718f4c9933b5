// kernels/dispatch_check.h — argument checks shared by kernels/dispatch*.cpp (internal).
//
//   check_arg(op, "x", x, dtype::f32);                       // defined, dtype, contiguous
//   check_shape(op, "out", out, x.shape());                   // exact shape
//   device dev = common_device(op, {{"x", &x}, {"w", &w}, {"out", &out}});
//   if (dev.is_cuda()) { cuda_guard g(dev); cuda::op(...); } else cpu::op(...);
//
// Invariants:
//   1. Every failure throws errc::invalid_argument naming the op, the argument and the
//      shapes involved (or errc::unsupported for a device this build cannot use).
//   2. common_device skips null entries (nullable arguments).
#pragma once
#include <fmt/format.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace troupe::kernels::dispatch_detail {

using runtime::device;
using runtime::dtype;
using runtime::errc;
using runtime::shape_t;
using runtime::shape_str;
using runtime::tensor;

constexpr dtype f32 = dtype::f32;
constexpr dtype i32 = dtype::i32;

// Raw pointers of checked tensors (nullptr for an absent nullable argument).
inline float* fp(const tensor& t) { return t.data<float>(); }
inline float* fp(const tensor* t) { return t ? t->data<float>() : nullptr; }
inline int32_t* ip(const tensor& t) { return t.data<int32_t>(); }

inline void check_arg(const char* op, const char* name, const tensor& t, dtype dt) {
  TROUPE_CHECK(t.defined(), errc::invalid_argument, "{}: argument '{}' is an undefined tensor", op, name);
  TROUPE_CHECK(t.dtype() == dt, errc::invalid_argument, "{}: argument '{}' is {} but must be {}", op, name,
               t.describe(), runtime::dtype_name(dt));
  TROUPE_CHECK(t.is_contiguous(), errc::invalid_argument,
               "{}: argument '{}' ({}) must be contiguous; call .contiguous() first", op, name, t.describe());
}

inline void check_shape(const char* op, const char* name, const tensor& t, const shape_t& want,
                        const std::string& why = {}) {
  TROUPE_CHECK(t.shape() == want, errc::invalid_argument, "{}: argument '{}' is {} but must have shape {}{}{}", op,
               name, t.describe(), shape_str(want), why.empty() ? "" : " ", why);
}

inline void check_ndim(const char* op, const char* name, const tensor& t, int ndim) {
  TROUPE_CHECK(t.ndim() == ndim, errc::invalid_argument, "{}: argument '{}' is {} but must have {} dimensions", op,
               name, t.describe(), ndim);
}

// Last dimension of a (..., C) tensor; requires at least one dimension.
inline int64_t last_dim(const char* op, const char* name, const tensor& t) {
  TROUPE_CHECK(t.ndim() >= 1, errc::invalid_argument, "{}: argument '{}' is {} but needs at least one dimension", op,
               name, t.describe());
  return t.shape().back();
}

inline shape_t leading(const tensor& t) { return shape_t(t.shape().begin(), t.shape().end() - 1); }
inline shape_t with_last(shape_t s, int64_t last) {
  s.push_back(last);
  return s;
}

struct named {
  const char* name;
  const tensor* t;
};

// The one device of all non-null arguments; cuda only in a CUDA build.
inline device common_device(const char* op, std::initializer_list<named> args) {
  const named* first = nullptr;
  for (const named& a : args) {
    if (a.t == nullptr || !a.t->defined()) continue;
    if (first == nullptr) {
      first = &a;
      continue;
    }
    TROUPE_CHECK(a.t->device() == first->t->device(), errc::invalid_argument,
                 "{}: arguments must be on one device, but '{}' is {} and '{}' is {}; move them with .to(device)", op,
                 first->name, first->t->describe(), a.name, a.t->describe());
  }
  const device dev = first ? first->t->device() : device::cpu();
#ifndef TROUPE_HAVE_CUDA
  TROUPE_CHECK(!dev.is_cuda(), errc::unsupported, "{}: tensors are on {} but this build has no CUDA", op, dev.str());
#endif
  return dev;
}

// Backward ops (and the expert FFN) run on the cpu only in this build.
inline void require_cpu(const char* op, device dev) {
  TROUPE_CHECK(dev.is_cpu(), errc::unsupported,
               "{} runs on the cpu only in this build (tensors are on {}); move them with .to(device::cpu())", op,
               dev.str());
}

// Makes `dev` the current CUDA device for the scope and restores the previous one.
class cuda_guard {
 public:
  explicit cuda_guard(device dev) {
#ifdef TROUPE_HAVE_CUDA
    if (dev.is_cuda() && cudaGetDevice(&prev_) == cudaSuccess && prev_ != dev.index) {
      cudaError_t e = cudaSetDevice(dev.index);
      TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaSetDevice({}) failed: {}", dev.index, cudaGetErrorString(e));
      restore_ = true;
    }
#else
    (void)dev;
#endif
  }
  ~cuda_guard() {
#ifdef TROUPE_HAVE_CUDA
    if (restore_) cudaSetDevice(prev_);
#endif
  }
  cuda_guard(const cuda_guard&) = delete;
  cuda_guard& operator=(const cuda_guard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

// Host copy of device (or host) i32 values, after the stream's pending work is done.
inline std::vector<int32_t> i32_to_host(const tensor& t, void* stream) {
#ifdef TROUPE_HAVE_CUDA
  if (t.device().is_cuda()) {
    cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaStreamSynchronize failed: {}", cudaGetErrorString(e));
  }
#else
  (void)stream;
#endif
  tensor h = t.device().is_cpu() ? t : t.to(device::cpu());
  const int32_t* p = h.data<int32_t>();
  return std::vector<int32_t>(p, p + h.numel());
}

}  // namespace troupe::kernels::dispatch_detail
