// parallel/model/kv_cache.cpp
#include "parallel/model/kv_cache.h"

#include <cstring>

namespace troupe::parallel {

using runtime::errc;

kv_cache::kv_cache(const runtime::model_config& c, int64_t batch, int64_t capacity)
    : batch_(batch), capacity_(capacity), row_(c.n_kv_heads * c.head_dim) {
  TROUPE_CHECK(batch > 0 && capacity > 0, errc::invalid_argument, "kv_cache: batch {} and capacity {} must be > 0",
               batch, capacity);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    k_.push_back(runtime::tensor::zeros({batch, capacity, c.n_kv_heads, c.head_dim}));
    v_.push_back(runtime::tensor::zeros({batch, capacity, c.n_kv_heads, c.head_dim}));
  }
}

void kv_cache::check_room(int64_t n) const {
  TROUPE_CHECK(n >= 0 && length_ + n <= capacity_, errc::out_of_range,
               "kv_cache: {} more tokens do not fit ({} of {} used); make the cache larger", n, length_, capacity_);
}

void kv_cache::write(int64_t layer, const float* k_new, const float* v_new, int64_t n) {
  check_room(n);
  float* K = k(layer);
  float* V = v(layer);
  const size_t bytes = static_cast<size_t>(n * row_) * sizeof(float);
  for (int64_t b = 0; b < batch_; ++b) {
    std::memcpy(K + (b * capacity_ + length_) * row_, k_new + b * n * row_, bytes);
    std::memcpy(V + (b * capacity_ + length_) * row_, v_new + b * n * row_, bytes);
  }
}

void kv_cache::advance(int64_t n) {
  check_room(n);
  length_ += n;
}

}  // namespace troupe::parallel
