// runtime/allocator.h — where tensor storage comes from.
//
//   allocator& a = allocator_for(device::cpu());
//   void* p = a.allocate(1 << 20);   // 64-byte aligned on the CPU
//   a.deallocate(p, 1 << 20);
//
// Invariants:
//   1. allocate(0) returns a valid, unique, freeable pointer (never nullptr).
//   2. Failure throws error(errc::io / errc::cuda) naming the size and device.
//   3. Allocators are process-wide singletons; tensors keep a pointer to theirs.
#pragma once
#include <cstddef>
#include <string>

#include "runtime/device.h"

namespace troupe::runtime {

class allocator {
 public:
  virtual ~allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  virtual device dev() const = 0;
  virtual std::string name() const = 0;
  // Bytes currently allocated through this allocator, and the peak.
  virtual size_t allocated_bytes() const = 0;
  virtual size_t peak_bytes() const = 0;
};

allocator& cpu_allocator();
// Throws errc::unsupported when CUDA is not built or no GPU answers.
allocator& cuda_allocator(int index = 0);
allocator& allocator_for(device d);

// The allocator tensor::empty uses for `dev` on the calling thread: the innermost live
// allocator_scope whose allocator serves `dev`, else allocator_for(dev). A tensor keeps the
// allocator it came from, so it is freed there wherever and whenever its last handle goes.
allocator& current_allocator(device dev);

// Routes this thread's tensor allocations for a.dev() to `a` while it lives (MEMO's step arena,
// parallel/memo/arena.h). Scopes nest; destroy them in reverse order, on the thread that made them.
class allocator_scope {
 public:
  explicit allocator_scope(allocator& a);
  ~allocator_scope();
  allocator_scope(const allocator_scope&) = delete;
  allocator_scope& operator=(const allocator_scope&) = delete;

 private:
  allocator* prev_;
};

// Copies bytes between any two devices (cudaMemcpy for CUDA, memcpy on the host).
void copy_bytes(void* dst, device dst_dev, const void* src, device src_dev, size_t bytes);

}  // namespace troupe::runtime
