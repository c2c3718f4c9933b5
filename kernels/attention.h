// kernels/attention.h — causal grouped-query attention, computed in tiles with an
// online softmax (FlashAttention-2 style): never a T x T matrix, memory O(T * HD).
//
//   attention_dims d{.B = 2, .Tq = 128, .Tk = 128, .NH = 8, .NKV = 2, .HD = 64};
//   cpu::attention_forward(out, lse, q, k, v, d);
//   cpu::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, d);
//
// Invariants:
//   1. Layouts are token-major, as the projections produce them:
//      q, out: (B, Tq, NH, HD); k, v: (B, Tk, NKV, HD) with batch stride kv_stride_b
//      (elements; 0 = Tk*NKV*HD, a KV cache of capacity > Tk sets it larger).
//   2. Query row i sits at absolute position Tk - Tq + i (so Tq < Tk is decoding with a
//      KV cache) and attends to keys j <= that position; with window > 0 only to keys
//      j > position - window (Mistral sliding window).
//   3. Query head h reads KV head h / (NH / NKV). NH % NKV == 0.
//   4. lse (B, NH, Tq) is the log-sum-exp of the scaled scores, saved for backward.
//   5. backward requires Tq == Tk and writes (=) dq, dk, dv.
#pragma once
#include <cstdint>

namespace troupe::kernels {

struct attention_dims {
  int64_t B = 1, Tq = 1, Tk = 1, NH = 1, NKV = 1, HD = 1;
  float scale = 0.0f;       // 0 = 1/sqrt(HD)
  int64_t window = 0;       // 0 = full causal
  int64_t kv_stride_b = 0;  // 0 = Tk * NKV * HD
};

namespace cpu {
// -> out: (B, Tq, NH, HD), lse: (B, NH, Tq) nullable
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d);
// dout: (B, T, NH, HD)  ->  dq: (B, T, NH, HD) =, dk, dv: (B, T, NKV, HD) =
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const attention_dims& d);
}  // namespace cpu
namespace cuda {
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
