#include "runtime/tensor.h"

#include <cstring>

#include "runtime/allocator.h"

namespace troupe::runtime {

storage::~storage() {
  if (alloc != nullptr && ptr != nullptr) alloc->deallocate(ptr, nbytes);
}

int64_t shape_numel(const shape_t& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string shape_str(const shape_t& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

shape_t contiguous_strides(const shape_t& shape) {
  shape_t st(shape.size());
  int64_t acc = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

static void check_shape(const shape_t& shape) {
  for (int64_t s : shape)
    TROUPE_CHECK(s >= 0, errc::invalid_argument, "shape {} has a negative dimension", shape_str(shape));
}

tensor tensor::empty(const shape_t& shape, runtime::dtype dt, runtime::device dev) {
  check_shape(shape);
  tensor t;
  auto st = std::make_shared<storage>();
  st->dev = dev;
  st->alloc = &current_allocator(dev);
  st->nbytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dt);
  st->ptr = st->alloc->allocate(st->nbytes);
  t.storage_ = std::move(st);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dt;
  return t;
}

tensor tensor::zeros(const shape_t& shape, runtime::dtype dt, runtime::device dev) {
  tensor t = empty(shape, dt, dev);
  t.zero_();
  return t;
}

tensor tensor::full(const shape_t& shape, double value, runtime::dtype dt) {
  tensor t = empty(shape, dt);
  t.fill_(value);
  return t;
}

tensor tensor::from_blob(void* data, const shape_t& shape, runtime::dtype dt, runtime::device dev,
                         std::shared_ptr<void> owner) {
  check_shape(shape);
  tensor t;
  auto st = std::make_shared<storage>();
  st->ptr = data;
  st->nbytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dt);
  st->dev = dev;
  st->owner = std::move(owner);
  t.storage_ = std::move(st);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dt;
  return t;
}

int64_t tensor::size(int dim) const {
  int d = dim < 0 ? dim + ndim() : dim;
  TROUPE_CHECK(d >= 0 && d < ndim(), errc::out_of_range, "tensor {}: dim {} out of range", describe(), dim);
  return shape_[d];
}

bool tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_) || numel() <= 1; }

void* tensor::data_ptr() const {
  TROUPE_CHECK(defined(), errc::invalid_argument, "data_ptr() on an undefined tensor");
  return static_cast<char*>(storage_->ptr) + offset_ * static_cast<int64_t>(dtype_size(dtype_));
}

tensor tensor::view(const shape_t& shape_in) const {
  TROUPE_CHECK(is_contiguous(), errc::invalid_argument, "view{} of non-contiguous tensor {}", shape_str(shape_in),
               describe());
  shape_t shape = shape_in;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      TROUPE_CHECK(infer < 0, errc::invalid_argument, "view{}: only one -1 allowed", shape_str(shape_in));
      infer = static_cast<int>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    TROUPE_CHECK(known > 0 && numel() % known == 0, errc::invalid_argument, "view{} of {}: sizes do not divide",
                 shape_str(shape_in), describe());
    shape[infer] = numel() / known;
  }
  TROUPE_CHECK(shape_numel(shape) == numel(), errc::invalid_argument, "view{} of {}: {} elements vs {}",
               shape_str(shape_in), describe(), shape_numel(shape), numel());
  tensor t = *this;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

tensor tensor::slice(int dim, int64_t start, int64_t end) const {
  int d = dim < 0 ? dim + ndim() : dim;
  TROUPE_CHECK(d >= 0 && d < ndim(), errc::out_of_range, "slice: dim {} of {}", dim, describe());
  TROUPE_CHECK(0 <= start && start <= end && end <= shape_[d], errc::out_of_range, "slice [{}, {}) of dim {} of {}",
               start, end, dim, describe());
  tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  return t;
}

tensor tensor::select(int dim, int64_t index) const {
  int d = dim < 0 ? dim + ndim() : dim;
  TROUPE_CHECK(d >= 0 && d < ndim(), errc::out_of_range, "select: dim {} of {}", dim, describe());
  TROUPE_CHECK(0 <= index && index < shape_[d], errc::out_of_range, "select index {} of dim {} of {}", index, dim,
               describe());
  tensor t = *this;
  t.offset_ += index * strides_[d];
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

namespace {
// Copies a strided cpu tensor into contiguous dst bytes.
void gather_strided(char* dst, const tensor& src) {
  const size_t es = dtype_size(src.dtype());
  const int nd = src.ndim();
  const char* base = static_cast<const char*>(src.data_ptr());
  const int64_t n = src.numel();
  std::vector<int64_t> idx(nd, 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int k = 0; k < nd; ++k) off += idx[k] * src.strides()[k];
    std::memcpy(dst + i * es, base + off * static_cast<int64_t>(es), es);
    for (int k = nd - 1; k >= 0; --k) {
      if (++idx[k] < src.shape()[k]) break;
      idx[k] = 0;
    }
  }
}
}  // namespace

tensor tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

tensor tensor::clone() const {
  tensor t = empty(shape_, dtype_, device());
  t.copy_from(*this);
  return t;
}

tensor tensor::to(runtime::device dev) const {
  if (dev == device()) return *this;
  tensor src = contiguous();
  tensor t = empty(shape_, dtype_, dev);
  copy_bytes(t.data_ptr(), dev, src.data_ptr(), src.device(), nbytes());
  return t;
}

tensor tensor::to(runtime::dtype dt) const {
  TROUPE_CHECK(device().is_cpu(), errc::unsupported, "to({}) of {}: dtype conversion runs on the cpu only",
               dtype_name(dt), describe());
  if (dt == dtype_) return *this;
  tensor src = contiguous();
  tensor t = empty(shape_, dt);
  convert(t.data_ptr(), dt, src.data_ptr(), dtype_, numel());
  return t;
}

void tensor::copy_from(const tensor& src) {
  TROUPE_CHECK(src.shape() == shape_ && src.dtype() == dtype_, errc::invalid_argument, "copy_from: {} into {}",
               src.describe(), describe());
  TROUPE_CHECK(is_contiguous(), errc::invalid_argument, "copy_from into non-contiguous {}", describe());
  if (src.is_contiguous()) {
    copy_bytes(data_ptr(), device(), src.data_ptr(), src.device(), nbytes());
    return;
  }
  TROUPE_CHECK(src.device().is_cpu(), errc::unsupported, "copy_from: strided source {} must be on the cpu",
               src.describe());
  if (device().is_cpu()) {
    gather_strided(static_cast<char*>(data_ptr()), src);
  } else {
    tensor tmp = src.contiguous();
    copy_bytes(data_ptr(), device(), tmp.data_ptr(), tmp.device(), nbytes());
  }
}

void tensor::zero_() {
  TROUPE_CHECK(is_contiguous(), errc::invalid_argument, "zero_ on non-contiguous {}", describe());
  if (device().is_cpu()) {
    std::memset(data_ptr(), 0, nbytes());
  } else {
    std::vector<char> z(nbytes(), 0);
    copy_bytes(data_ptr(), device(), z.data(), runtime::device::cpu(), nbytes());
  }
}

void tensor::fill_(double value) {
  TROUPE_CHECK(device().is_cpu() && is_contiguous(), errc::unsupported, "fill_ on {}: cpu contiguous only",
               describe());
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype_) {
      case dtype::f32: static_cast<float*>(data_ptr())[i] = static_cast<float>(value); break;
      case dtype::bf16: static_cast<uint16_t*>(data_ptr())[i] = f32_to_bf16(static_cast<float>(value)); break;
      case dtype::f16: static_cast<uint16_t*>(data_ptr())[i] = f32_to_f16(static_cast<float>(value)); break;
      case dtype::i32: static_cast<int32_t*>(data_ptr())[i] = static_cast<int32_t>(value); break;
      case dtype::i64: static_cast<int64_t*>(data_ptr())[i] = static_cast<int64_t>(value); break;
      case dtype::u8: static_cast<uint8_t*>(data_ptr())[i] = static_cast<uint8_t>(value); break;
    }
  }
}

double tensor::item() const {
  TROUPE_CHECK(numel() == 1, errc::invalid_argument, "item() of {} (needs one element)", describe());
  TROUPE_CHECK(device().is_cpu(), errc::unsupported, "item() of {}: cpu only", describe());
  float f;
  double d;
  switch (dtype_) {
    case dtype::f32: return static_cast<float*>(data_ptr())[0];
    case dtype::bf16:
    case dtype::f16:
    case dtype::u8:
      convert(&f, dtype::f32, data_ptr(), dtype_, 1);
      return f;
    case dtype::i32: return static_cast<int32_t*>(data_ptr())[0];
    case dtype::i64:
      d = static_cast<double>(static_cast<int64_t*>(data_ptr())[0]);
      return d;
  }
  return 0;
}

double tensor::at(std::initializer_list<int64_t> idx) const {
  TROUPE_CHECK(static_cast<int>(idx.size()) == ndim(), errc::invalid_argument, "at(): {} indices for {}",
               idx.size(), describe());
  tensor t = *this;
  for (int64_t i : idx) t = t.select(0, i);
  return t.item();
}

std::string tensor::describe() const {
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_str(shape_), device().str());
}

}  // namespace troupe::runtime
