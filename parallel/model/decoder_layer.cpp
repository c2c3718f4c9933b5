// parallel/model/decoder_layer.cpp — one pre-norm decoder layer, forward and backward.
#include "parallel/model/decoder_layer.h"

#include <cstring>
#include <vector>

#include "kernels/rmsnorm.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;
using runtime::tensor;

namespace {
size_t nb(const tensor& t) { return t.defined() ? t.nbytes() : 0; }
size_t nb(const mlp_activations& m) { return nb(m.h_gate) + nb(m.h_up) + nb(m.act); }
void ensure(tensor& t, const runtime::shape_t& shape) {
  if (!t.defined() || t.shape() != shape) t = tensor::empty(shape);
}
}  // namespace

size_t layer_activations::bytes() const {
  size_t s = nb(x_in) + nb(xn1) + nb(rstd1) + nb(q) + nb(k) + nb(v) + nb(att) + nb(lse) + nb(x_mid) + nb(xn2) +
             nb(rstd2) + nb(mlp);
  s += nb(moe.probs) + nb(moe.topk_idx) + nb(moe.topk_w) + nb(moe.xp) + nb(moe.h_gate) + nb(moe.h_up) + nb(moe.yp) +
       nb(moe.shared) + nb(moe.shared_out) + nb(moe.shared_gate);
  s += (moe.offsets.size() + moe.row_slot.size() + moe.slot_row.size()) * sizeof(int32_t);
  return s;
}

void layer_forward(float* x, layer_activations& a, const layer_params& L, const model_config& c,
                   const attention_geom& g, const float* cos, const float* sin, kv_cache* cache, int64_t layer,
                   moe_runner* moe) {
  const int64_t N = g.N(), C = g.C;
  ensure(a.x_in, {N, C});
  ensure(a.xn1, {N, C});
  ensure(a.rstd1, {N});
  ensure(a.q, {N, g.QD()});
  ensure(a.k, {N, g.KVD()});
  ensure(a.v, {N, g.KVD()});
  ensure(a.att, {N, g.QD()});
  ensure(a.lse, {g.B, g.NH, g.T});
  ensure(a.x_mid, {N, C});
  ensure(a.xn2, {N, C});
  ensure(a.rstd2, {N});
  const float eps = static_cast<float>(c.rms_norm_eps);
  const size_t row_bytes = static_cast<size_t>(N * C) * sizeof(float);
  runtime::work_buffer branch(static_cast<size_t>(N * C));

  std::memcpy(a.x_in.data<float>(), x, row_bytes);
  kc::rmsnorm_forward(a.xn1.data<float>(), a.rstd1.data<float>(), x, L.input_norm.data<float>(), N, C, eps);
  attention_block_forward(branch.data(), a.q.data<float>(), a.k.data<float>(), a.v.data<float>(), a.att.data<float>(),
                          a.lse.data<float>(), a.xn1.data<float>(), L, g, cos, sin, cache, layer);
  for (int64_t i = 0; i < N * C; ++i) x[i] += branch[static_cast<size_t>(i)];
  std::memcpy(a.x_mid.data<float>(), x, row_bytes);
  kc::rmsnorm_forward(a.xn2.data<float>(), a.rstd2.data<float>(), x, L.post_norm.data<float>(), N, C, eps);
  if (L.is_moe && moe)
    moe->forward(layer, branch.data(), a.xn2.data<float>(), L, c, N);
  else if (L.is_moe)
    moe_forward(branch.data(), a.moe, a.xn2.data<float>(), L, c, N);
  else
    mlp_forward(branch.data(), a.mlp, a.xn2.data<float>(), L.gate_w, L.up_w, L.down_w, N, C, c.intermediate);
  for (int64_t i = 0; i < N * C; ++i) x[i] += branch[static_cast<size_t>(i)];
}

void layer_backward(float* dx, layer_params& G, const layer_activations& a, const layer_params& L,
                    const model_config& c, const attention_geom& g, const float* cos, const float* sin,
                    int64_t layer, moe_runner* moe) {
  const int64_t N = g.N(), C = g.C;
  runtime::work_buffer dxn(static_cast<size_t>(N * C)), dres(dxn.size());
  // FFN branch: dx (= d x_out) flows to x_mid directly and through ffn(rmsnorm2(x_mid)).
  if (L.is_moe && moe)
    moe->backward(layer, dxn.data(), G, dx, a.xn2.data<float>(), L, c, N);
  else if (L.is_moe)
    moe_backward(dxn.data(), G, dx, a.moe, a.xn2.data<float>(), L, c, N);
  else
    mlp_backward(dxn.data(), G.gate_w, G.up_w, G.down_w, dx, a.mlp, a.xn2.data<float>(), L.gate_w, L.up_w, L.down_w,
                 N, C, c.intermediate);
  kc::rmsnorm_backward(dres.data(), fptr(G.post_norm), dxn.data(), a.x_mid.data<float>(), L.post_norm.data<float>(),
                       a.rstd2.data<float>(), N, C);
  for (int64_t i = 0; i < N * C; ++i) dx[i] += dres[static_cast<size_t>(i)];  // dx = d x_mid
  // Attention branch.
  attention_block_backward(dxn.data(), G, dx, a.xn1.data<float>(), a.q.data<float>(), a.k.data<float>(),
                           a.v.data<float>(), a.att.data<float>(), a.lse.data<float>(), L, g, cos, sin);
  kc::rmsnorm_backward(dres.data(), fptr(G.input_norm), dxn.data(), a.x_in.data<float>(),
                       L.input_norm.data<float>(), a.rstd1.data<float>(), N, C);
  for (int64_t i = 0; i < N * C; ++i) dx[i] += dres[static_cast<size_t>(i)];  // dx = d x_in
}

}  // namespace troupe::parallel
