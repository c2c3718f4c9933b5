// kernels/attention.h — causal grouped-query attention, computed in tiles with an
// online softmax (FlashAttention-2 style): never a T x T matrix, memory O(T * HD).
//
//   attention_dims d{.B = 2, .Tq = 128, .Tk = 128, .NH = 8, .NKV = 2, .HD = 64};
//   cpu::attention_forward(out, lse, q, k, v, d);
//   cpu::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, d);
//   d.q_offset = 256;  // these 128 queries sit at 256.., the 128 keys at 0..127 (a ring block)
//
// Invariants:
//   1. Layouts are token-major, as the projections produce them:
//      q, out: (B, Tq, NH, HD); k, v: (B, Tk, NKV, HD) with batch stride kv_stride_b
//      (elements; 0 = Tk*NKV*HD, a KV cache of capacity > Tk sets it larger).
//   2. Query row i sits at position q_offset + i, key j at position j; q_offset defaults
//      (-1) to Tk - Tq (so Tq < Tk is decoding with a KV cache). A query attends to keys
//      j <= its position (j < Tk); with window > 0 only to keys j > position - window
//      (Mistral sliding window). An explicit q_offset >= 0 is one block of a longer
//      sequence (ring attention: q_offset = (query block - key block) * block length).
//   3. Query head h reads KV head h / (NH / NKV). NH % NKV == 0.
//   4. lse (B, NH, Tq) is the log-sum-exp of the scaled scores, saved for backward.
//   5. A query row that sees no key (only possible with an explicit q_offset and a window)
//      gets out 0 and lse -inf.
//   6. backward writes (=) dq, dk, dv. It requires Tq == Tk unless q_offset is explicit; given
//      the out and lse of the WHOLE softmax row (all key blocks merged), it returns this key
//      block's exact share of the gradient (FlashAttention-2: dS = P * (dP - rowsum(dO*O)),
//      P = exp(S - lse)), so per-block dq add up and per-block dk, dv are final.
//   7. q_offset is implemented by the cpu kernels only (cuda::attention_forward does not read it yet).
#pragma once
#include <cstdint>

namespace troupe::kernels {

struct attention_dims {
  int64_t B = 1, Tq = 1, Tk = 1, NH = 1, NKV = 1, HD = 1;
  float scale = 0.0f;       // 0 = 1/sqrt(HD)
  int64_t window = 0;       // 0 = full causal
  int64_t kv_stride_b = 0;  // 0 = Tk * NKV * HD
  int64_t q_offset = -1;    // position of query row 0 (keys start at 0); -1 = Tk - Tq
};

namespace cpu {
// -> out: (B, Tq, NH, HD), lse: (B, NH, Tq) nullable
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d);
// dout, out: (B, Tq, NH, HD), lse: (B, NH, Tq)  ->  dq: (B, Tq, NH, HD) =,
// dk, dv: (B, Tk, NKV, HD) = (dense; each nullable)
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const attention_dims& d);
}  // namespace cpu
namespace cuda {
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
