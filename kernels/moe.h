// kernels/moe.h — the Mixture-of-Experts pieces: router softmax + top-k, token permute
// and unpermute, and the grouped SwiGLU expert FFN.
//
//   cpu::moe_router_forward(probs, topk_idx, topk_w, logits, N, E, K, /*normalize=*/true);
//   std::vector<int32_t> offsets(E + 1), row_slot(N * K), slot_row(N * K);
//   cpu::moe_permute_plan(offsets.data(), row_slot.data(), slot_row.data(), topk_idx, N, E, K);
//   cpu::moe_permute(xp, x, slot_row.data(), N * K, K, C);
//   cpu::moe_expert_ffn_forward(yp, hg, hu, xp, wg, wu, wd, offsets.data(), E, C, I);
//   cpu::moe_unpermute(out, yp, topk_w, row_slot.data(), N, K, C);
//
// Invariants:
//   1. probs = softmax(logits) over E experts in fp32; top-k picks the K largest
//      (ties: the lower expert id first), in descending order of probability.
//      normalize=true divides the K weights by their sum (Mixtral; Qwen2-MoE's
//      norm_topk_prob), otherwise the weights are the raw probabilities.
//   2. The permutation is deterministic: slots are grouped by expert (ascending) and,
//      inside an expert, ordered by (token, k). "Row" r = n*K + k is the k-th choice of
//      token n; row_slot[r] is its slot; slot_row[s] is the inverse.
//   3. unpermute sums the K contributions of a token in k order (0..K-1): this fixed
//      order is what makes expert-parallel results bitwise equal to a single rank's.
//   4. Expert weights are passed as arrays of E pointers (nn.Linear layout: gate/up
//      (I, C), down (C, I)) so experts may live anywhere (borrowed, remapped).
//   5. The expert FFN runs each expert's rows in tiles of moe_row_tile rows counted from the
//      expert's first row, every tile one set of sgemm calls, and accumulates weight gradients
//      tile after tile. So a rank that computes rows [b, e) of an expert, b a multiple of the
//      tile, writes bitwise what one call over all the expert's rows writes there (LLEP,
//      parallel/ep/ep_layer.h).
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
inline constexpr int64_t moe_row_tile = 64;  // invariant 5

// logits: (N, E)  ->  probs: (N, E), topk_idx: (N, K), topk_w: (N, K)
void moe_router_forward(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N, int64_t E,
                        int64_t K, bool normalize);
// dtopk_w: (N, K)  ->  dlogits: (N, E) =
void moe_router_backward(float* dlogits, const float* dtopk_w, const float* probs, const int32_t* topk_idx,
                         const float* topk_w, int64_t N, int64_t E, int64_t K, bool normalize);

// topk_idx: (N, K)  ->  expert_offsets: (E + 1), row_slot: (N*K), slot_row: (N*K)
// Throws errc::out_of_range for an expert id outside [0, E).
void moe_permute_plan(int32_t* expert_offsets, int32_t* row_slot, int32_t* slot_row, const int32_t* topk_idx,
                      int64_t N, int64_t E, int64_t K);
// x: (N, C)  ->  xp: (N*K, C), xp[s] = x[slot_row[s] / K]
void moe_permute(float* xp, const float* x, const int32_t* slot_row, int64_t NK, int64_t K, int64_t C);
// dxp: (N*K, C)  ->  dx: (N, C) =, dx[n] = sum_k dxp[row_slot[n*K+k]] (k order)
void moe_permute_backward(float* dx, const float* dxp, const int32_t* row_slot, int64_t N, int64_t K, int64_t C);
// yp: (N*K, C)  topk_w: (N, K)  ->  out: (N, C) =, out[n] = sum_k topk_w[n,k] * yp[row_slot[n*K+k]]
void moe_unpermute(float* out, const float* yp, const float* topk_w, const int32_t* row_slot, int64_t N, int64_t K,
                   int64_t C);
// dout: (N, C)  ->  dyp: (N*K, C) =, dtopk_w: (N, K) =
void moe_unpermute_backward(float* dyp, float* dtopk_w, const float* dout, const float* yp, const float* topk_w,
                            const int32_t* row_slot, int64_t N, int64_t K, int64_t C);

// Grouped SwiGLU FFN over the permuted rows; expert e owns rows [offsets[e], offsets[e+1]).
// xp: (R, C)  ->  yp: (R, C), h_gate, h_up: (R, I) (pre-activations saved for backward)
void moe_expert_ffn_forward(float* yp, float* h_gate, float* h_up, const float* xp, const float* const* w_gate,
                            const float* const* w_up, const float* const* w_down, const int32_t* expert_offsets,
                            int64_t E, int64_t C, int64_t I);
// dyp: (R, C)  ->  dxp: (R, C) =, dw_gate[e], dw_up[e]: (I, C) +=, dw_down[e]: (C, I) +=
void moe_expert_ffn_backward(float* dxp, float* const* dw_gate, float* const* dw_up, float* const* dw_down,
                             const float* dyp, const float* xp, const float* h_gate, const float* h_up,
                             const float* const* w_gate, const float* const* w_up, const float* const* w_down,
                             const int32_t* expert_offsets, int64_t E, int64_t C, int64_t I);
}  // namespace cpu
namespace cuda {
void moe_router_forward(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N, int64_t E,
                        int64_t K, bool normalize, void* stream = nullptr);
// Device-side permutation from a plan computed on the host (moe_permute_plan).
void moe_permute(float* xp, const float* x, const int32_t* slot_row, int64_t NK, int64_t K, int64_t C,
                 void* stream = nullptr);
void moe_unpermute(float* out, const float* yp, const float* topk_w, const int32_t* row_slot, int64_t N, int64_t K,
                   int64_t C, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
