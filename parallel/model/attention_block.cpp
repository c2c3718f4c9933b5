// parallel/model/attention_block.cpp — attention half of a layer from the kernels.
#include "parallel/model/attention_block.h"

#include <vector>

#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "kernels/rope.h"
#include "parallel/cp/context_parallel.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;

attention_geom attention_geom::of(const model_config& c, int64_t B, int64_t T, int64_t rotary_dim) {
  attention_geom g;
  g.B = B;
  g.T = T;
  g.C = c.hidden;
  g.NH = c.n_heads;
  g.NKV = c.n_kv_heads;
  g.HD = c.head_dim;
  g.rotary_dim = rotary_dim;
  g.window = c.sliding_window;
  return g;
}

void attention_block_forward(float* out, float* q, float* k, float* v, float* att, float* lse, const float* xn,
                             const layer_params& L, const attention_geom& g, const float* cos, const float* sin,
                             kv_cache* cache, int64_t layer) {
  const int64_t N = g.N(), C = g.C, QD = g.QD(), KVD = g.KVD();
  kc::matmul_forward(q, xn, L.q_w.data<float>(), fptr(L.q_b), N, C, QD);
  kc::matmul_forward(k, xn, L.k_w.data<float>(), fptr(L.k_b), N, C, KVD);
  kc::matmul_forward(v, xn, L.v_w.data<float>(), fptr(L.v_b), N, C, KVD);
  kc::rope_forward(q, q, cos, sin, g.B, g.T, g.NH, g.HD, g.rotary_dim);
  kc::rope_forward(k, k, cos, sin, g.B, g.T, g.NKV, g.HD, g.rotary_dim);
  kernels::attention_dims d;
  d.B = g.B;
  d.Tq = g.T;
  d.NH = g.NH;
  d.NKV = g.NKV;
  d.HD = g.HD;
  d.window = g.window;
  if (cache) {
    TROUPE_CHECK(g.cp == nullptr, runtime::errc::unsupported,
                 "attention_block_forward: decoding with a KV cache does not run under context parallelism");
    cache->write(layer, k, v, g.T);
    d.Tk = cache->length() + g.T;
    d.kv_stride_b = cache->batch_stride();
    kc::attention_forward(att, lse, q, cache->k(layer), cache->v(layer), d);
  } else if (g.cp != nullptr) {
    d.Tk = g.T;
    cp_attention_forward(att, lse, q, k, v, d, *g.cp);
  } else {
    d.Tk = g.T;
    kc::attention_forward(att, lse, q, k, v, d);
  }
  kc::matmul_forward(out, att, L.o_w.data<float>(), fptr(L.o_b), N, QD, C);
}

void attention_block_backward(float* dxn, layer_params& G, const float* dout, const float* xn, const float* q,
                              const float* k, const float* v, const float* att, const float* lse,
                              const layer_params& L, const attention_geom& g, const float* cos, const float* sin) {
  const int64_t N = g.N(), C = g.C, QD = g.QD(), KVD = g.KVD();
  runtime::work_buffer datt(static_cast<size_t>(N * QD)), dq(datt.size());
  runtime::work_buffer dk(static_cast<size_t>(N * KVD)), dv(dk.size()), tmp(static_cast<size_t>(N * C));
  kc::matmul_backward(datt.data(), fptr(G.o_w), fptr(G.o_b), dout, att, L.o_w.data<float>(), N, QD, C);
  kernels::attention_dims d;
  d.B = g.B;
  d.Tq = d.Tk = g.T;
  d.NH = g.NH;
  d.NKV = g.NKV;
  d.HD = g.HD;
  d.window = g.window;
  if (g.cp != nullptr)
    cp_attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), q, k, v, att, lse, d, *g.cp);
  else
    kc::attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), q, k, v, att, lse, d);
  kc::rope_backward(dq.data(), dq.data(), cos, sin, g.B, g.T, g.NH, g.HD, g.rotary_dim);
  kc::rope_backward(dk.data(), dk.data(), cos, sin, g.B, g.T, g.NKV, g.HD, g.rotary_dim);
  kc::matmul_backward(dxn, fptr(G.q_w), fptr(G.q_b), dq.data(), xn, L.q_w.data<float>(), N, C, QD);
  kc::matmul_backward(tmp.data(), fptr(G.k_w), fptr(G.k_b), dk.data(), xn, L.k_w.data<float>(), N, C, KVD);
  for (int64_t i = 0; i < N * C; ++i) dxn[i] += tmp[static_cast<size_t>(i)];
  kc::matmul_backward(tmp.data(), fptr(G.v_w), fptr(G.v_b), dv.data(), xn, L.v_w.data<float>(), N, C, KVD);
  for (int64_t i = 0; i < N * C; ++i) dxn[i] += tmp[static_cast<size_t>(i)];
}

}  // namespace troupe::parallel
