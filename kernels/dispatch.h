// kernels/dispatch.h — the tensor-level entry to every op: checks dtypes, contiguity,
// shapes and devices, then calls kernels::cpu or kernels::cuda by the tensors' device.
//
//   tensor x = tensor::empty({B, T, C}), w = ..., out = tensor::empty({B, T, C});
//   tensor rstd = tensor::empty({B, T});
//   kernels::rmsnorm_forward(out, &rstd, x, w, 1e-5f);                 // cpu here
//   kernels::matmul_forward(y, out, wq, nullptr, stream.native_handle()); // cuda when on cuda
//
// Invariants:
//   1. Float tensors are f32, ids and plans i32; every tensor is contiguous, except that
//      k and v of attention may be batch slices of a larger KV cache (their dim-0 stride
//      becomes kv_stride_b). Outputs are allocated by the caller.
//   2. "Rows" ops take any leading shape: x (..., C) has rows = numel / C, and each
//      output's shape is stated per op below ([...] = x's leading dims).
//   3. All tensors of one call live on one device; a mismatch, a wrong dtype or shape
//      throws errc::invalid_argument naming the op, the argument and the shapes.
//   4. Forward ops run on the cpu or on cuda (a cuda tensor in a build without CUDA
//      throws errc::unsupported). Backward ops and the expert FFN run on the cpu only in
//      this build; with cuda tensors they throw errc::unsupported.
//   5. `stream` is a cudaStream_t (nullptr = the default stream), ignored on the cpu.
//      cuda ops are asynchronous, except that embedding and cross_entropy synchronise
//      the stream to range-check their ids on the host first.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/adamw.h"
#include "runtime/tensor.h"

namespace troupe::kernels {

using runtime::tensor;

// ---- dense forward (cpu | cuda) -------------------------------------------------------
// ids: [...] i32  wte: (V, C)  ->  out: [..., C]
void embedding_forward(tensor& out, const tensor& ids, const tensor& wte, void* stream = nullptr);
// inp: (..., C)  weight: (OC, C)  bias: (OC) nullable  ->  out: (..., OC)
void matmul_forward(tensor& out, const tensor& inp, const tensor& weight, const tensor* bias,
                    void* stream = nullptr);
// x: (..., C)  w: (C)  ->  out: like x (may be x itself), rstd: [...] nullable
void rmsnorm_forward(tensor& out, tensor* rstd, const tensor& x, const tensor& w, float eps, void* stream = nullptr);
// inp: (B, T, NH, HD)  cos, sin: (T, rotary_dim/2)  ->  out: like inp (may be inp itself)
void rope_forward(tensor& out, const tensor& inp, const tensor& cos, const tensor& sin, void* stream = nullptr);

struct attention_options {
  float scale = 0.0f;  // 0 = 1/sqrt(HD)
  int64_t window = 0;  // 0 = full causal
};
// q: (B, Tq, NH, HD)  k, v: (B, Tk, NKV, HD)  ->  out: like q, lse: (B, NH, Tq) nullable
void attention_forward(tensor& out, tensor* lse, const tensor& q, const tensor& k, const tensor& v,
                       const attention_options& opt = {}, void* stream = nullptr);
// gate, up: (..., I)  ->  out: like gate
void swiglu_forward(tensor& out, const tensor& gate, const tensor& up, void* stream = nullptr);
// logits: (..., V)  targets: [...] i32  ->  losses: [...]
void cross_entropy_forward(tensor& losses, const tensor& logits, const tensor& targets, void* stream = nullptr);
// param, grad, m, v: one shape; param, m, v updated in place.
void adamw_update(tensor& param, const tensor& grad, tensor& m, tensor& v, const adamw_params& hp, int64_t step,
                  void* stream = nullptr);

// ---- dense backward (cpu only) ------------------------------------------------------
// dout: [..., C]  ->  dwte: (V, C) +=
void embedding_backward(tensor& dwte, const tensor& dout, const tensor& ids);
// dout: (..., OC)  ->  dinp: like inp =, dweight: (OC, C) +=, dbias: (OC) +=  (all nullable)
void matmul_backward(tensor* dinp, tensor* dweight, tensor* dbias, const tensor& dout, const tensor& inp,
                     const tensor& weight);
// dout: (..., C)  ->  dx: like x =, dw: (C) += nullable
void rmsnorm_backward(tensor& dx, tensor* dw, const tensor& dout, const tensor& x, const tensor& w,
                      const tensor& rstd);
// dout: (B, T, NH, HD)  ->  dinp: like dout = (may be dout itself)
void rope_backward(tensor& dinp, const tensor& dout, const tensor& cos, const tensor& sin);
// dout: (B, T, NH, HD)  ->  dq: like q =, dk, dv: like k = (Tq == Tk, contiguous k, v)
void attention_backward(tensor& dq, tensor& dk, tensor& dv, const tensor& dout, const tensor& q, const tensor& k,
                        const tensor& v, const tensor& out, const tensor& lse, const attention_options& opt = {});
// dout: (..., I)  ->  dgate, dup: like gate =
void swiglu_backward(tensor& dgate, tensor& dup, const tensor& dout, const tensor& gate, const tensor& up);
// h: (..., C)  W: (V, C)  targets: [...]  ->  losses: [...], dh: like h = (nullable), dW: (V, C) += (nullable)
void classifier_forward_backward(tensor& losses, tensor* dh, tensor* dW, const tensor& h, const tensor& W,
                                 const tensor& targets, float grad_scale, int64_t chunk_tokens = 256);

// ---- MoE ------------------------------------------------------------------------------
// logits: (N, E)  ->  probs: (N, E), topk_idx: (N, K) i32, topk_w: (N, K); K = topk_idx.size(1). cpu | cuda
void moe_router_forward(tensor& probs, tensor& topk_idx, tensor& topk_w, const tensor& logits, bool normalize,
                        void* stream = nullptr);
// topk_idx: (N, K) i32 on the cpu  ->  expert_offsets: (E + 1), row_slot, slot_row: (N*K), i32 on the cpu
void moe_permute_plan(tensor& expert_offsets, tensor& row_slot, tensor& slot_row, const tensor& topk_idx);
// x: (N, C)  slot_row: (N*K) i32  ->  xp: (N*K, C). cpu | cuda
void moe_permute(tensor& xp, const tensor& x, const tensor& slot_row, int64_t K, void* stream = nullptr);
// yp: (N*K, C)  topk_w: (N, K)  row_slot: (N*K) i32  ->  out: (N, C). cpu | cuda
void moe_unpermute(tensor& out, const tensor& yp, const tensor& topk_w, const tensor& row_slot,
                   void* stream = nullptr);
// Expert weights: E tensors each, gate/up (I, C), down (C, I); expert_offsets (E + 1) i32 on the cpu.
// xp: (R, C)  ->  yp: (R, C), h_gate, h_up: (R, I). cpu only.
void moe_expert_ffn_forward(tensor& yp, tensor& h_gate, tensor& h_up, const tensor& xp,
                            const std::vector<tensor>& w_gate, const std::vector<tensor>& w_up,
                            const std::vector<tensor>& w_down, const tensor& expert_offsets);

// MoE backward (cpu only).
// dtopk_w: (N, K)  ->  dlogits: (N, E) =
void moe_router_backward(tensor& dlogits, const tensor& dtopk_w, const tensor& probs, const tensor& topk_idx,
                         const tensor& topk_w, bool normalize);
// dxp: (N*K, C)  ->  dx: (N, C) =
void moe_permute_backward(tensor& dx, const tensor& dxp, const tensor& row_slot);
// dout: (N, C)  ->  dyp: (N*K, C) =, dtopk_w: (N, K) =
void moe_unpermute_backward(tensor& dyp, tensor& dtopk_w, const tensor& dout, const tensor& yp, const tensor& topk_w,
                            const tensor& row_slot);
// dyp: (R, C)  ->  dxp: (R, C) =, dw_gate[e], dw_up[e]: (I, C) +=, dw_down[e]: (C, I) +=
void moe_expert_ffn_backward(tensor& dxp, std::vector<tensor>& dw_gate, std::vector<tensor>& dw_up,
                             std::vector<tensor>& dw_down, const tensor& dyp, const tensor& xp, const tensor& h_gate,
                             const tensor& h_up, const std::vector<tensor>& w_gate, const std::vector<tensor>& w_up,
                             const std::vector<tensor>& w_down, const tensor& expert_offsets);

}  // namespace troupe::kernels
