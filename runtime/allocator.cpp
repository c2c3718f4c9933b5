#include "runtime/allocator.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "runtime/error.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace troupe::runtime {

namespace {

class counting_allocator : public allocator {
 public:
  size_t allocated_bytes() const override { return allocated_.load(); }
  size_t peak_bytes() const override { return peak_.load(); }

 protected:
  void on_alloc(size_t b) {
    size_t now = allocated_.fetch_add(b) + b;
    size_t p = peak_.load();
    while (now > p && !peak_.compare_exchange_weak(p, now)) {
    }
  }
  void on_free(size_t b) { allocated_.fetch_sub(b); }

 private:
  std::atomic<size_t> allocated_{0};
  std::atomic<size_t> peak_{0};
};

class cpu_allocator_impl final : public counting_allocator {
 public:
  void* allocate(size_t bytes) override {
    size_t rounded = ((bytes + 63) / 64) * 64;
    if (rounded == 0) rounded = 64;
    void* p = std::aligned_alloc(64, rounded);
    TROUPE_CHECK(p != nullptr, errc::io, "cpu: out of memory allocating {} bytes", bytes);
    on_alloc(bytes);
    return p;
  }
  void deallocate(void* ptr, size_t bytes) override {
    std::free(ptr);
    on_free(bytes);
  }
  device dev() const override { return device::cpu(); }
  std::string name() const override { return "cpu"; }
};

#ifdef TROUPE_HAVE_CUDA
class cuda_allocator_impl final : public counting_allocator {
 public:
  explicit cuda_allocator_impl(int index) : index_(index) {}
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    cudaSetDevice(index_);
    cudaError_t e = cudaMalloc(&p, bytes == 0 ? 256 : bytes);
    TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cuda:{}: cudaMalloc of {} bytes failed: {}", index_, bytes,
                 cudaGetErrorString(e));
    on_alloc(bytes);
    return p;
  }
  void deallocate(void* ptr, size_t bytes) override {
    cudaSetDevice(index_);
    cudaFree(ptr);
    on_free(bytes);
  }
  device dev() const override { return device::cuda(index_); }
  std::string name() const override { return fmt::format("cuda:{}", index_); }

 private:
  int index_;
};
#endif

}  // namespace

allocator& cpu_allocator() {
  static cpu_allocator_impl a;
  return a;
}

allocator& cuda_allocator(int index) {
#ifdef TROUPE_HAVE_CUDA
  cuda_state s = cuda_status();
  TROUPE_CHECK(s.available, errc::unsupported, "cuda:{} requested but CUDA is not usable: {}", index, s.reason);
  TROUPE_CHECK(index >= 0 && index < s.device_count, errc::invalid_argument, "cuda:{} does not exist ({} devices)",
               index, s.device_count);
  static std::mutex mu;
  static std::map<int, std::unique_ptr<cuda_allocator_impl>> allocs;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = allocs[index];
  if (!slot) slot = std::make_unique<cuda_allocator_impl>(index);
  return *slot;
#else
  TROUPE_THROW(errc::unsupported, "cuda:{} requested but this build has no CUDA", index);
#endif
}

allocator& allocator_for(device d) { return d.is_cpu() ? cpu_allocator() : cuda_allocator(d.index); }

namespace {
thread_local allocator* scoped_allocator = nullptr;  // innermost allocator_scope on this thread
}  // namespace

allocator& current_allocator(device dev) {
  if (scoped_allocator != nullptr && scoped_allocator->dev() == dev) return *scoped_allocator;
  return allocator_for(dev);
}

allocator_scope::allocator_scope(allocator& a) : prev_(scoped_allocator) { scoped_allocator = &a; }
allocator_scope::~allocator_scope() { scoped_allocator = prev_; }

void copy_bytes(void* dst, device dst_dev, const void* src, device src_dev, size_t bytes) {
  if (bytes == 0) return;
  if (dst_dev.is_cpu() && src_dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef TROUPE_HAVE_CUDA
  cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  TROUPE_CHECK(e == cudaSuccess, errc::cuda, "cudaMemcpy {} -> {} of {} bytes failed: {}", src_dev.str(),
               dst_dev.str(), bytes, cudaGetErrorString(e));
#else
  TROUPE_THROW(errc::unsupported, "copy {} -> {}: this build has no CUDA", src_dev.str(), dst_dev.str());
#endif
}

}  // namespace troupe::runtime
