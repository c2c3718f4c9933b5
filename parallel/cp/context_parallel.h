// parallel/cp/context_parallel.h — context parallelism: the tokens of every sequence are
// split in contiguous chunks over the ranks of a CP group, and only attention talks to the
// other ranks (everything else is token-wise and stays local).
//
//   context_parallel cp{.comm = group[r].get(), .mode = cp_mode::ring};
//   dec.set_context_parallel(&cp);          // rank r now holds tokens [r*T, (r+1)*T) of each sequence
//   float part = dec.forward_backward(ids_r, targets_r, B, T, g, {.loss_denominator = tokens});
//   // loss = sum of `part` over the CP ranks; g is this rank's contribution (all-reduce over dp*cp)
//
// The attention itself, for callers below the decoder (attention_block):
//   cp_attention_forward(out, lse, q, k, v, d, cp);                  // d: the LOCAL dims, Tq == Tk == T
//   cp_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, d, cp);
//
// Invariants:
//   1. Every rank of the group holds the same B and T (its chunk) and calls the same layers in
//      the same order; query and key positions are rank*T + t. The results equal causal
//      attention over the whole sequence of T*size tokens (fp32 rounding aside).
//   2. ulysses (DeepSpeed-Ulysses): one all_to_all turns token-sharded q/k/v into head-sharded
//      full sequences (rank s gets query heads [s*NH/P, (s+1)*NH/P) and kv heads
//      [s*NKV/P, (s+1)*NKV/P), so GQA's head h -> kv head h/(NH/NKV) stays inside a rank), the
//      kernel runs over all T*P tokens, and one all_to_all brings out/lse back. Needs NH % P == 0
//      and NKV % P == 0. Holds O(T*P * NH/P) = O(T*NH) per rank, like the local q.
//   3. ring: k/v chunks travel around the ring with send/recv (never gathered): at step s rank r
//      holds chunk (r - s) mod P; chunk j < r is fully visible (kernel q_offset = (r-j)*T),
//      j == r causal, j > r skipped (and, with a window, chunks wholly outside it). Partial
//      results merge by log-sum-exp. Backward sends (k, v, dk, dv) around the same ring; each
//      rank adds its share (FlashAttention-2 decomposition with the final out/lse) and after P
//      hops dk/dv are back, final, at their owner. Memory O(T) per step.
//   4. out, lse, dq, dk, dv are written (=) in the local layout: out, dq (B, T, NH, HD);
//      dk, dv (B, T, NKV, HD); lse (B, NH, T).
//   5. Misuse (no communicator, heads not divisible for ulysses) throws errc::invalid_argument
//      naming the numbers; a communicator failure propagates (errc::io / errc::aborted).
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "runtime/communicator.h"

namespace troupe::parallel {

enum class cp_mode { ulysses, ring };

struct context_parallel {
  runtime::communicator* comm = nullptr;  // the CP group: rank r holds tokens [r*T, (r+1)*T) of every sequence
  cp_mode mode = cp_mode::ulysses;
  int rank() const;
  int size() const;
};

const char* cp_mode_name(cp_mode m);

// Throws errc::invalid_argument (naming `where` and the numbers) unless `cp` can run attention
// with NH query heads and NKV kv heads.
void cp_check(const context_parallel& cp, int64_t NH, int64_t NKV, const char* where);

// q: (B, T, NH, HD), k, v: (B, T, NKV, HD) this rank's chunk (after RoPE)
//   ->  out: (B, T, NH, HD) =, lse: (B, NH, T) = (nullable)
void cp_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                          const kernels::attention_dims& d, const context_parallel& cp);
// dout: (B, T, NH, HD), out/lse from cp_attention_forward  ->  dq: (B, T, NH, HD) =, dk, dv: (B, T, NKV, HD) =
void cp_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                           const float* v, const float* out, const float* lse, const kernels::attention_dims& d,
                           const context_parallel& cp);

}  // namespace troupe::parallel
