// parallel/model/moe_block.cpp — MoE layer forward/backward from the kernels.
#include "parallel/model/moe_block.h"

#include <cmath>

#include "kernels/cpu/blas.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;
using runtime::tensor;

namespace {
std::vector<const float*> cptrs(const std::vector<tensor>& ts) {
  std::vector<const float*> p;
  for (const auto& t : ts) p.push_back(t.data<float>());
  return p;
}
std::vector<float*> mptrs(const std::vector<tensor>& ts) {
  std::vector<float*> p;
  for (const auto& t : ts) p.push_back(t.data<float>());
  return p;
}
// out (N, M) = A (N, Kd) · op(B), op(B) = B^T (B: (M, Kd)) when trans_b, else B (Kd, M); every row is
// computed by a call of exactly `tile` rows (the last tile zero-padded), so a token's result does
// not depend on how many tokens share the call: OpenBLAS picks its kernels by matrix shape, and a
// router logit that differed in the last bit between one rank's batch and the whole batch would
// make expert parallelism inexact (invariant 3).
void batch_invariant_matmul(float* out, const float* A, const float* B, bool trans_b, int64_t N, int64_t M,
                            int64_t Kd) {
  constexpr int64_t tile = 16;
  const int64_t ldb = trans_b ? Kd : M;
  const int64_t full = N / tile * tile;
  for (int64_t r = 0; r < full; r += tile)
    kc::sgemm(false, trans_b, tile, M, Kd, 1.0f, A + r * Kd, Kd, B, ldb, 0.0f, out + r * M, M);
  if (full == N) return;
  std::vector<float> a(static_cast<size_t>(tile * Kd), 0.0f), o(static_cast<size_t>(tile * M));
  std::copy(A + full * Kd, A + N * Kd, a.begin());
  kc::sgemm(false, trans_b, tile, M, Kd, 1.0f, a.data(), Kd, B, ldb, 0.0f, o.data(), M);
  std::copy(o.begin(), o.begin() + (N - full) * M, out + full * M);
}
}  // namespace

bool moe_normalize_topk(const model_config& c) {
  return c.family == runtime::model_family::mixtral ? true : c.norm_topk_prob;
}

void moe_route(moe_activations& a, const float* x, const layer_params& L, const model_config& c, int64_t N) {
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k, R = N * K;
  runtime::work_buffer logits(static_cast<size_t>(N * E));
  batch_invariant_matmul(logits.data(), x, L.router_w.data<float>(), /*trans_b=*/true, N, E, C);  // (N, E)
  a.probs = tensor::empty({N, E});
  a.topk_idx = tensor::empty({N, K}, runtime::dtype::i32);
  a.topk_w = tensor::empty({N, K});
  kc::moe_router_forward(a.probs.data<float>(), a.topk_idx.data<int32_t>(), a.topk_w.data<float>(), logits.data(), N,
                         E, K, moe_normalize_topk(c));
  a.offsets.assign(static_cast<size_t>(E + 1), 0);
  a.row_slot.assign(static_cast<size_t>(R), 0);
  a.slot_row.assign(static_cast<size_t>(R), 0);
  kc::moe_permute_plan(a.offsets.data(), a.row_slot.data(), a.slot_row.data(), a.topk_idx.data<int32_t>(), N, E, K);
}

void moe_shared_forward(float* out, moe_activations& a, const float* x, const layer_params& L, const model_config& c,
                        int64_t N) {
  if (c.shared_expert_intermediate <= 0) return;
  // Qwen2-MoE: out += sigmoid(x . w_sg) * shared_mlp(x)
  const int64_t C = c.hidden, Is = c.shared_expert_intermediate;
  a.shared_out = tensor::empty({N, C});
  a.shared_gate = tensor::empty({N});
  mlp_forward(a.shared_out.data<float>(), a.shared, x, L.shared_gate_w, L.shared_up_w, L.shared_down_w, N, C, Is);
  float* sg = a.shared_gate.data<float>();
  kc::matmul_forward(sg, x, L.shared_expert_gate.data<float>(), nullptr, N, C, 1);
  const float* so = a.shared_out.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    sg[n] = 1.0f / (1.0f + std::exp(-sg[n]));
    for (int64_t i = 0; i < C; ++i) out[n * C + i] += sg[n] * so[n * C + i];
  }
}

void moe_forward(float* out, moe_activations& a, const float* x, const layer_params& L, const model_config& c,
                 int64_t N) {
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k, Im = c.moe_intermediate, R = N * K;
  moe_route(a, x, L, c, N);
  a.xp = tensor::empty({R, C});
  a.h_gate = tensor::empty({R, Im});
  a.h_up = tensor::empty({R, Im});
  a.yp = tensor::empty({R, C});
  kc::moe_permute(a.xp.data<float>(), x, a.slot_row.data(), R, K, C);
  const auto wg = cptrs(L.expert_gate), wu = cptrs(L.expert_up), wd = cptrs(L.expert_down);
  kc::moe_expert_ffn_forward(a.yp.data<float>(), a.h_gate.data<float>(), a.h_up.data<float>(), a.xp.data<float>(),
                             wg.data(), wu.data(), wd.data(), a.offsets.data(), E, C, Im);
  kc::moe_unpermute(out, a.yp.data<float>(), a.topk_w.data<float>(), a.row_slot.data(), N, K, C);
  moe_shared_forward(out, a, x, L, c, N);
}

void moe_backward(float* dx, layer_params& G, const float* dout, const moe_activations& a, const float* x,
                  const layer_params& L, const model_config& c, int64_t N) {
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k, Im = c.moe_intermediate, R = N * K;
  runtime::work_buffer dyp(static_cast<size_t>(R * C)), dtopk_w(static_cast<size_t>(N * K));
  runtime::work_buffer dxp(static_cast<size_t>(R * C));
  kc::moe_unpermute_backward(dyp.data(), dtopk_w.data(), dout, a.yp.data<float>(), a.topk_w.data<float>(),
                             a.row_slot.data(), N, K, C);
  const auto wg = cptrs(L.expert_gate), wu = cptrs(L.expert_up), wd = cptrs(L.expert_down);
  const auto dwg = mptrs(G.expert_gate), dwu = mptrs(G.expert_up), dwd = mptrs(G.expert_down);
  kc::moe_expert_ffn_backward(dxp.data(), dwg.data(), dwu.data(), dwd.data(), dyp.data(), a.xp.data<float>(),
                              a.h_gate.data<float>(), a.h_up.data<float>(), wg.data(), wu.data(), wd.data(),
                              a.offsets.data(), E, C, Im);
  kc::moe_permute_backward(dx, dxp.data(), a.row_slot.data(), N, K, C);
  moe_router_shared_backward(dx, G, dout, dtopk_w.data(), a, x, L, c, N);
}

void moe_router_shared_backward(float* dx, layer_params& G, const float* dout, const float* dtopk_w,
                                const moe_activations& a, const float* x, const layer_params& L,
                                const model_config& c, int64_t N) {
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k;
  runtime::work_buffer dlogits(static_cast<size_t>(N * E)), tmp(static_cast<size_t>(N * C));
  kc::moe_router_backward(dlogits.data(), dtopk_w, a.probs.data<float>(), a.topk_idx.data<int32_t>(),
                          a.topk_w.data<float>(), N, E, K, moe_normalize_topk(c));
  batch_invariant_matmul(tmp.data(), dlogits.data(), L.router_w.data<float>(), /*trans_b=*/false, N, C, E);
  kc::matmul_backward(nullptr, fptr(G.router_w), nullptr, dlogits.data(), x, nullptr, N, C, E);  // dW += dl^T x
  for (int64_t i = 0; i < N * C; ++i) dx[i] += tmp[static_cast<size_t>(i)];
  if (c.shared_expert_intermediate <= 0) return;
  const int64_t Is = c.shared_expert_intermediate;
  const float* sg = a.shared_gate.data<float>();
  const float* so = a.shared_out.data<float>();
  runtime::work_buffer dso(static_cast<size_t>(N * C)), dsg(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    double dot = 0.0;
    for (int64_t i = 0; i < C; ++i) {
      dso[static_cast<size_t>(n * C + i)] = dout[n * C + i] * sg[n];
      dot += static_cast<double>(dout[n * C + i]) * so[n * C + i];
    }
    dsg[static_cast<size_t>(n)] = static_cast<float>(dot) * sg[n] * (1.0f - sg[n]);  // through the sigmoid
  }
  mlp_backward(tmp.data(), G.shared_gate_w, G.shared_up_w, G.shared_down_w, dso.data(), a.shared, x, L.shared_gate_w,
               L.shared_up_w, L.shared_down_w, N, C, Is);
  for (int64_t i = 0; i < N * C; ++i) dx[i] += tmp[static_cast<size_t>(i)];
  kc::matmul_backward(tmp.data(), fptr(G.shared_expert_gate), nullptr, dsg.data(), x,
                      L.shared_expert_gate.data<float>(), N, C, 1);
  for (int64_t i = 0; i < N * C; ++i) dx[i] += tmp[static_cast<size_t>(i)];
}

}  // namespace troupe::parallel
