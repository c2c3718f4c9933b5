// parallel/model/attention_block.h — the self-attention half of a decoder layer:
// q/k/v projections (+bias) -> RoPE on q, k -> causal GQA attention (sliding window)
// -> o projection (+bias).
//
//   attention_geom g = attention_geom::of(cfg, B, T);
//   attention_block_forward(out, q, k, v, att, lse, xn, L, g, cos, sin, /*cache=*/nullptr, l);
//   attention_block_backward(dxn, G, dout, xn, q, k, v, att, lse, L, g, cos, sin);
//
// Invariants:
//   1. Token-major layouts: xn, out (B*T, C); q, att (B*T, NH*HD); k, v (B*T, NKV*HD),
//      q and k saved after RoPE. cos/sin: (T, rotary_dim/2) for the T new positions.
//   2. With a cache, the new k/v go into the cache at [length, length+T) and attention
//      reads the whole cache (Tq = T < Tk = length + T); the cache's length is not advanced.
//   3. backward (no cache, Tq == Tk) writes (=) dxn and accumulates (+=) into G's
//      q/k/v/o weights and biases.
//   4. With g.cp set (context parallelism, no cache), the T tokens are this rank's chunk of
//      every sequence (cos/sin for its positions) and the attention core runs over the whole
//      sequence through parallel/cp/context_parallel.h; lse stays in the local (B, NH, T) layout.
#pragma once
#include <cstdint>

#include "parallel/model/kv_cache.h"
#include "parallel/model/model_weights.h"

namespace troupe::parallel {

struct context_parallel;

struct attention_geom {
  int64_t B = 1, T = 1, C = 1, NH = 1, NKV = 1, HD = 1, rotary_dim = 1, window = 0;
  const context_parallel* cp = nullptr;  // context parallelism: T is this rank's chunk; nullptr = off
  int64_t N() const { return B * T; }
  int64_t QD() const { return NH * HD; }
  int64_t KVD() const { return NKV * HD; }
  static attention_geom of(const model_config& c, int64_t B, int64_t T, int64_t rotary_dim);
};

// xn: (N, C)  ->  out: (N, C) =; q, att: (N, QD), k, v: (N, KVD), lse: (B, NH, T) nullable
void attention_block_forward(float* out, float* q, float* k, float* v, float* att, float* lse, const float* xn,
                             const layer_params& L, const attention_geom& g, const float* cos, const float* sin,
                             kv_cache* cache, int64_t layer);
// dout: (N, C)  ->  dxn: (N, C) =, G's attention tensors +=
void attention_block_backward(float* dxn, layer_params& G, const float* dout, const float* xn, const float* q,
                              const float* k, const float* v, const float* att, const float* lse,
                              const layer_params& L, const attention_geom& g, const float* cos, const float* sin);

}  // namespace troupe::parallel
