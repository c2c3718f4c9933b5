// parallel/model/paged_kv.h — the block-paged KV cache of a serving instance: per layer one
// K and one V tensor of num_blocks blocks of block_size tokens. Which blocks a sequence uses is
// decided elsewhere (the block manager); this is only the storage.
//
//   const int64_t n = paged_kv_store::blocks_for_budget(cfg, /*block_size=*/16, 2ull << 30);
//   paged_kv_store kv(cfg, n, 16);
//   float* k = kv.k(layer) + kv.slot(block_id, pos % 16);   // NKV*HD floats of one token
//   kv.copy_block(shared_id, private_id);                    // copy-on-write of a shared block
//
// Invariants:
//   1. k(l), v(l): (num_blocks, block_size, NKV, HD) f32, contiguous; the token in row r of block
//      b sits at k(l) + slot(b, r) = k(l) + (b * block_size + r) * NKV * HD (RoPE applied).
//   2. bytes() == num_blocks * bytes_per_block(config, block_size): a block holds the K and V of
//      block_size tokens in every layer.
//   3. The storage is zero-filled at construction and never reallocated: pointers from k()/v()
//      stay valid for the store's lifetime.
//   4. check_config() throws errc::invalid_argument unless the store's layers, KV heads and head
//      dim are the model's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "runtime/io/hf_config.h"
#include "runtime/tensor.h"

namespace troupe::parallel {

class paged_kv_store {
 public:
  paged_kv_store(const runtime::model_config& c, int64_t num_blocks, int64_t block_size);

  // K + V bytes of one block of `block_size` tokens over all layers.
  static size_t bytes_per_block(const runtime::model_config& c, int64_t block_size);
  // The most blocks that fit in `bytes` (0 when not even one does).
  static int64_t blocks_for_budget(const runtime::model_config& c, int64_t block_size, size_t bytes);

  int64_t num_layers() const { return static_cast<int64_t>(k_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t n_kv_heads() const { return n_kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t row() const { return n_kv_heads_ * head_dim_; }   // floats per token
  int64_t block_stride() const { return block_size_ * row(); }  // floats per block
  size_t bytes() const;

  // Element offset of row `r` of block `b` in k(l) / v(l).
  int64_t slot(int64_t b, int64_t r) const { return (b * block_size_ + r) * row(); }
  float* k(int64_t layer) { return k_[static_cast<size_t>(layer)].data<float>(); }
  float* v(int64_t layer) { return v_[static_cast<size_t>(layer)].data<float>(); }
  const float* k(int64_t layer) const { return k_[static_cast<size_t>(layer)].data<float>(); }
  const float* v(int64_t layer) const { return v_[static_cast<size_t>(layer)].data<float>(); }
  // (num_blocks, block_size, NKV, HD) handles sharing the storage
  const runtime::tensor& k_tensor(int64_t layer) const { return k_[static_cast<size_t>(layer)]; }
  const runtime::tensor& v_tensor(int64_t layer) const { return v_[static_cast<size_t>(layer)]; }

  // Block `dst` := block `src` in every layer's K and V (errc::out_of_range for a bad id).
  void copy_block(int64_t src, int64_t dst);
  // Throws errc::invalid_argument, naming `where`, unless this store was built for `c`'s shapes.
  void check_config(const runtime::model_config& c, const char* where) const;

 private:
  int64_t num_blocks_, block_size_, n_kv_heads_, head_dim_;
  std::vector<runtime::tensor> k_, v_;
};

}  // namespace troupe::parallel
