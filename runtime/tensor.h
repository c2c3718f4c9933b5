// runtime/tensor.h — an n-dimensional array: owning storage or a view of it.
//
//   tensor x = tensor::zeros({2, 16, 64});              // f32 on the cpu
//   float* p = x.data<float>();
//   tensor row = x.select(0, 1);                        // view (16, 64), shares storage
//   tensor w = tensor::from_blob(ptr, {64, 64}, dtype::bf16, device::cpu(), mmap_owner);
//   tensor w32 = w.to(dtype::f32);                      // new storage
//
// Invariants:
//   1. A tensor is a (storage, element offset, shape, strides, dtype) tuple; views share
//      storage and keep it alive (shared_ptr). Copying a tensor copies the handle.
//   2. Shapes and strides are int64_t, in elements; strides of a fresh tensor are
//      row-major contiguous.
//   3. data<T>() checks that T matches the dtype; data_ptr() is untyped.
//   4. Element access helpers (at/fill/to(dtype)) work on cpu tensors only; moving between
//      devices is to(device).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace troupe::runtime {

class allocator;

using shape_t = std::vector<int64_t>;

// The memory behind one or more tensors.
struct storage {
  void* ptr = nullptr;
  size_t nbytes = 0;
  device dev;
  allocator* alloc = nullptr;      // frees ptr when set
  std::shared_ptr<void> owner;     // keeps external memory (an mmap) alive when set
  storage() = default;
  storage(const storage&) = delete;
  storage& operator=(const storage&) = delete;
  ~storage();
};

int64_t shape_numel(const shape_t& shape);
std::string shape_str(const shape_t& shape);  // "[2, 16, 64]"

class tensor {
 public:
  tensor() = default;

  static tensor empty(const shape_t& shape, dtype dt = dtype::f32, device dev = device::cpu());
  static tensor zeros(const shape_t& shape, dtype dt = dtype::f32, device dev = device::cpu());
  static tensor full(const shape_t& shape, double value, dtype dt = dtype::f32);  // cpu
  // A view of memory troupe does not own; `owner` (may be null) is kept alive.
  static tensor from_blob(void* data, const shape_t& shape, dtype dt, device dev,
                          std::shared_ptr<void> owner = nullptr);
  // Copies host values into a new cpu tensor.
  template <typename T>
  static tensor from_vector(const std::vector<T>& values, const shape_t& shape);

  bool defined() const { return storage_ != nullptr; }
  const shape_t& shape() const { return shape_; }
  const shape_t& strides() const { return strides_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int dim) const;  // negative dims count from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  runtime::dtype dtype() const { return dtype_; }
  runtime::device device() const { return storage_ ? storage_->dev : runtime::device::cpu(); }
  bool is_contiguous() const;
  int64_t offset() const { return offset_; }

  void* data_ptr() const;
  template <typename T>
  T* data() const {
    TROUPE_CHECK(dtype_ == dtype_of<T>(), errc::invalid_argument, "tensor {}: data<{}>() on a {} tensor",
                 describe(), dtype_name(dtype_of<T>()), dtype_name(dtype_));
    return static_cast<T*>(data_ptr());
  }

  // Views (share storage).
  tensor view(const shape_t& shape) const;  // contiguous only; one -1 allowed
  tensor slice(int dim, int64_t start, int64_t end) const;
  tensor select(int dim, int64_t index) const;  // removes dim

  // Copies (new storage).
  tensor contiguous() const;
  tensor clone() const;
  tensor to(runtime::device dev) const;
  tensor to(runtime::dtype dt) const;  // cpu only
  void copy_from(const tensor& src);   // same shape; any devices; src may be strided on cpu
  void zero_();
  void fill_(double value);  // cpu

  // Element access on the cpu (slow; for tests and I/O), as double.
  double item() const;
  double at(std::initializer_list<int64_t> idx) const;

  std::string describe() const;  // "f32[2, 16, 64] cpu"
  const std::shared_ptr<storage>& storage_handle() const { return storage_; }

 private:
  std::shared_ptr<storage> storage_;
  int64_t offset_ = 0;  // in elements
  shape_t shape_;
  shape_t strides_;
  runtime::dtype dtype_ = runtime::dtype::f32;
};

shape_t contiguous_strides(const shape_t& shape);

template <typename T>
tensor tensor::from_vector(const std::vector<T>& values, const shape_t& shape) {
  TROUPE_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape), errc::invalid_argument,
               "from_vector: {} values for shape {}", values.size(), shape_str(shape));
  tensor t = empty(shape, dtype_of<T>());
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}

// A zero-filled f32 work buffer with std::vector's interface, allocated as a tensor through
// current_allocator (allocator.h): the model's transients use it so that MEMO's step arena
// (parallel/memo/arena.h) serves them. Zero-filled like std::vector<float>(n).
class work_buffer {
 public:
  explicit work_buffer(size_t n) : t_(tensor::zeros({static_cast<int64_t>(n)})), p_(t_.data<float>()), n_(n) {}
  float* data() { return p_; }
  const float* data() const { return p_; }
  size_t size() const { return n_; }
  float& operator[](size_t i) { return p_[i]; }
  const float& operator[](size_t i) const { return p_[i]; }

 private:
  tensor t_;
  float* p_;
  size_t n_;
};

}  // namespace troupe::runtime
