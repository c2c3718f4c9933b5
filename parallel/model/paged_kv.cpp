// parallel/model/paged_kv.cpp — storage of the block-paged KV cache.
#include "parallel/model/paged_kv.h"

#include <cstring>

namespace troupe::parallel {

using runtime::errc;

paged_kv_store::paged_kv_store(const runtime::model_config& c, int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size), n_kv_heads_(c.n_kv_heads), head_dim_(c.head_dim) {
  TROUPE_CHECK(num_blocks > 0 && block_size > 0, errc::invalid_argument,
               "paged_kv_store: num_blocks {} and block_size {} must be > 0", num_blocks, block_size);
  TROUPE_CHECK(c.n_layers > 0 && c.n_kv_heads > 0 && c.head_dim > 0, errc::invalid_argument,
               "paged_kv_store: the config has {} layers, {} kv heads, head dim {} (all must be > 0)", c.n_layers,
               c.n_kv_heads, c.head_dim);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    k_.push_back(runtime::tensor::zeros({num_blocks, block_size, c.n_kv_heads, c.head_dim}));
    v_.push_back(runtime::tensor::zeros({num_blocks, block_size, c.n_kv_heads, c.head_dim}));
  }
}

size_t paged_kv_store::bytes_per_block(const runtime::model_config& c, int64_t block_size) {
  TROUPE_CHECK(block_size > 0, errc::invalid_argument, "paged_kv_store: block_size {} must be > 0", block_size);
  return 2 * static_cast<size_t>(c.n_layers) * static_cast<size_t>(block_size) * static_cast<size_t>(c.n_kv_heads) *
         static_cast<size_t>(c.head_dim) * sizeof(float);
}

int64_t paged_kv_store::blocks_for_budget(const runtime::model_config& c, int64_t block_size, size_t bytes) {
  const size_t per = bytes_per_block(c, block_size);
  TROUPE_CHECK(per > 0, errc::invalid_argument, "paged_kv_store: the config has no KV bytes per block");
  return static_cast<int64_t>(bytes / per);
}

size_t paged_kv_store::bytes() const {
  return 2 * k_.size() * static_cast<size_t>(num_blocks_ * block_stride()) * sizeof(float);
}

void paged_kv_store::copy_block(int64_t src, int64_t dst) {
  TROUPE_CHECK(src >= 0 && src < num_blocks_ && dst >= 0 && dst < num_blocks_, errc::out_of_range,
               "paged_kv_store::copy_block: blocks {} -> {} outside [0, {})", src, dst, num_blocks_);
  if (src == dst) return;
  const size_t n = static_cast<size_t>(block_stride()) * sizeof(float);
  for (size_t l = 0; l < k_.size(); ++l) {
    float* K = k_[l].data<float>();
    float* V = v_[l].data<float>();
    std::memcpy(K + dst * block_stride(), K + src * block_stride(), n);
    std::memcpy(V + dst * block_stride(), V + src * block_stride(), n);
  }
}

void paged_kv_store::check_config(const runtime::model_config& c, const char* where) const {
  TROUPE_CHECK(num_layers() == c.n_layers && n_kv_heads_ == c.n_kv_heads && head_dim_ == c.head_dim,
               errc::invalid_argument,
               "{}: the paged KV store holds {} layers x {} kv heads x head dim {}, the model has {} x {} x {}; "
               "build the store from this model's config",
               where, num_layers(), n_kv_heads_, head_dim_, c.n_layers, c.n_kv_heads, c.head_dim);
}

}  // namespace troupe::parallel
