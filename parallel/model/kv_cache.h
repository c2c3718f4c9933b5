// parallel/model/kv_cache.h — the keys and values of past tokens, per layer, for
// incremental decoding: one (B, capacity, NKV, HD) tensor for K and one for V per layer.
//
//   kv_cache cache(cfg, /*B=*/1, /*capacity=*/prompt_len + max_new_tokens);
//   dec.forward_cached(prompt.data(), 1, prompt_len, cache);   // prefill
//   dec.forward_cached(&next, 1, 1, cache);                     // one token per step
//
// Invariants:
//   1. Every sequence of the batch holds the same number of tokens, length(); token t of
//      sequence b of layer l lives at k(l) + (b*capacity + t) * NKV*HD (RoPE applied).
//   2. append() of more than capacity() - length() tokens throws errc::out_of_range;
//      the cache is unchanged then.
//   3. length() advances only through advance(), called once per forward_cached after
//      every layer has written its keys/values.
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/io/hf_config.h"
#include "runtime/tensor.h"

namespace troupe::parallel {

class kv_cache {
 public:
  kv_cache(const runtime::model_config& c, int64_t batch, int64_t capacity);

  int64_t batch() const { return batch_; }
  int64_t capacity() const { return capacity_; }
  int64_t length() const { return length_; }
  int64_t row() const { return row_; }           // NKV * HD, elements per token
  int64_t batch_stride() const { return capacity_ * row_; }
  float* k(int64_t layer) { return k_[static_cast<size_t>(layer)].data<float>(); }
  float* v(int64_t layer) { return v_[static_cast<size_t>(layer)].data<float>(); }

  // Throws when `n` more tokens do not fit (checked before any layer writes).
  void check_room(int64_t n) const;
  // k_new, v_new: (B, n, NKV*HD) of layer `layer` -> written at positions [length, length+n).
  void write(int64_t layer, const float* k_new, const float* v_new, int64_t n);
  void advance(int64_t n);
  void reset() { length_ = 0; }

 private:
  int64_t batch_, capacity_, row_, length_ = 0;
  std::vector<runtime::tensor> k_, v_;
};

}  // namespace troupe::parallel
