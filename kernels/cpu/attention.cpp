// kernels/cpu/attention.cpp — causal GQA attention, FlashAttention-2 style on the CPU:
// tiles of kTileQ queries x kTileK keys with an online softmax; never a T x T matrix.
//
// forward:  OpenMP over (batch, head, query tile); each item streams its key tiles.
// backward: D = rowsum(dout * out); then
//   pass 1, OpenMP over (batch, kv head, key tile): dK, dV of that tile, summing over the
//           group's query heads and the query tiles in a fixed order;
//   pass 2, OpenMP over (batch, head, query tile): dQ, over key tiles in order.
// Each output element has one owner and a fixed operation order (deterministic, no atomics);
// the price is recomputing S and dP in pass 2.
#include "kernels/attention.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/attention_tiles.h"
#include "runtime/error.h"

// The per-tile work is compiled for AVX-512, AVX2 and the baseline; the loader picks one
// (GCC function multiversioning). Same bits in every clone (see attention_tiles.h, vf16).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TROUPE_ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TROUPE_ATTN_CLONES
#endif

namespace troupe::kernels::cpu {

namespace {
using namespace attn;
using runtime::errc;

void check_dims(const attention_dims& d, const char* where) {
  TROUPE_CHECK(d.B > 0 && d.Tq > 0 && d.Tk > 0 && d.NH > 0 && d.NKV > 0 && d.HD > 0, errc::invalid_argument,
               "{}: all of B {}, Tq {}, Tk {}, NH {}, NKV {}, HD {} must be > 0", where, d.B, d.Tq, d.Tk, d.NH,
               d.NKV, d.HD);
  TROUPE_CHECK(d.NH % d.NKV == 0, errc::invalid_argument,
               "{}: num heads {} must be a multiple of num kv heads {}", where, d.NH, d.NKV);
  TROUPE_CHECK(d.q_offset >= -1, errc::invalid_argument, "{}: q_offset {} must be >= 0 (or -1: Tk - Tq)", where,
               d.q_offset);
  TROUPE_CHECK(d.q_offset >= 0 || d.Tq <= d.Tk, errc::invalid_argument,
               "{}: Tq {} > Tk {}: the queries must be the last Tq of the Tk positions (or set q_offset)", where,
               d.Tq, d.Tk);
  TROUPE_CHECK(d.window >= 0, errc::invalid_argument, "{}: window {} must be >= 0 (0 = full causal)", where,
               d.window);
  TROUPE_CHECK(d.kv_stride_b == 0 || d.kv_stride_b >= d.Tk * d.NKV * d.HD, errc::invalid_argument,
               "{}: kv_stride_b {} is smaller than Tk * NKV * HD = {}", where, d.kv_stride_b,
               d.Tk * d.NKV * d.HD);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread scratch, all O(tile * HD).
struct workspace {
  std::vector<float> Qs, dO, KT, VT, KVr, Acc1, Acc2, S, dP, m, l;
  explicit workspace(int64_t HD)
      : Qs(kTileQ * HD), dO(kTileQ * HD), KT(HD * kTileK), VT(HD * kTileK), KVr(kTileK * HD),
        Acc1(kTileQ * HD), Acc2(kTileK * HD), S(kTileQ * kTileK), dP(kTileQ * kTileK), m(kTileQ), l(kTileQ) {}
};

// ---- forward: one (b, h, query tile) ---------------------------------------------------
TROUPE_ATTN_CLONES void forward_item(workspace& w, const attn_geom& g, int64_t b, int64_t h, int64_t q0, float* out, float* lse,
                  const float* q, const float* k, const float* v) {
  const int64_t HD = g.HD;
  const int64_t rows = q0 + kTileQ <= g.Tq ? kTileQ : g.Tq - q0;
  const int64_t kvh = h / g.group;
  const float* kb = k + b * g.kv_sb + kvh * HD;
  const float* vb = v + b * g.kv_sb + kvh * HD;
  float* O = w.Acc1.data();
  float* S = w.S.data();
  float* m = w.m.data();
  float* l = w.l.data();
  load_rows(w.Qs.data(), q + b * g.Tq * g.q_st + h * HD, q0, rows, g.q_st, HD, g.scale);
  for (int64_t r = 0; r < rows; ++r) m[r] = kNegInf, l[r] = 0.0f;
  for (int64_t x = 0; x < rows * HD; ++x) O[x] = 0.0f;

  const int64_t klo = g.key_lo(q0), khi = g.key_hi(q0 + rows);
  for (int64_t k0 = klo / kTileK * kTileK; k0 < khi; k0 += kTileK) {
    const int64_t cols = k0 + kTileK <= g.Tk ? kTileK : g.Tk - k0;
    load_transposed(w.KT.data(), kb, k0, cols, g.kv_st, HD);
    load_rows(w.KVr.data(), vb, k0, cols, g.kv_st, HD, 1.0f);  // V tile (cols, HD)
    tile_scores(S, w.Qs.data(), w.KT.data(), rows, HD);
    tile_mask(S, g, q0, rows, k0);
    // Online softmax: rescale the running sum and output by exp(m_old - m_new).
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * kTileK;
      const float mx = row_max(s);
      const float m_new = mx > m[r] ? mx : m[r];
      if (m_new == kNegInf) {  // nothing visible yet in this row (window)
        for (int64_t c = 0; c < kTileK; ++c) s[c] = 0.0f;
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);
      const float sum = exp_row_sum(s, m_new);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != 1.0f)
        for (int64_t x = 0; x < HD; ++x) O[r * HD + x] *= alpha;
    }
    // O (rows, HD) += P (rows, cols) @ V (cols, HD)
    mk_gemm(O, HD, S, kTileK, 1, w.KVr.data(), HD, rows, cols, HD, true);
  }
  float* ob = out + b * g.Tq * g.q_st + h * HD;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = ob + (q0 + r) * g.q_st;
    float* ls = lse != nullptr ? lse + (b * g.NH + h) * g.Tq + q0 + r : nullptr;
    if (l[r] == 0.0f) {  // the row sees no key (explicit q_offset with a window)
      for (int64_t x = 0; x < HD; ++x) o[x] = 0.0f;
      if (ls != nullptr) *ls = kNegInf;
      continue;
    }
    const float inv = 1.0f / l[r];
    for (int64_t x = 0; x < HD; ++x) o[x] = O[r * HD + x] * inv;
    if (ls != nullptr) *ls = m[r] + std::log(l[r]);
  }
}

// ---- backward helpers ------------------------------------------------------------------
// For query rows [q0, q0+rows) x keys [k0, k0+kTileK): w.S = P = exp(S - lse), w.dP = dS =
// P * (dO V^T - D). Needs w.Qs (scaled q), w.dO, w.KT, w.VT loaded.
TROUPE_ATTN_CLONES void tile_grad(workspace& w, const attn_geom& g, int64_t q0, int64_t rows, int64_t k0, const float* lse,
                      const float* D) {
  float* S = w.S.data();
  float* dP = w.dP.data();
  tile_scores(S, w.Qs.data(), w.KT.data(), rows, g.HD);
  tile_mask(S, g, q0, rows, k0);
  tile_scores(dP, w.dO.data(), w.VT.data(), rows, g.HD);
  for (int64_t r = 0; r < rows; ++r) {
    if (lse[r] == kNegInf) {  // a row that sees no key at all: no probability, no gradient
      for (int64_t c = 0; c < kTileK; ++c) S[r * kTileK + c] = 0.0f, dP[r * kTileK + c] = 0.0f;
      continue;
    }
    probs_and_dscores(S + r * kTileK, dP + r * kTileK, lse[r], D[r]);
  }
}

// Pass 1: dK, dV of keys [k0, k0 + kTileK) of KV head kvh.
TROUPE_ATTN_CLONES void backward_kv_item(workspace& w, const attn_geom& g, int64_t b, int64_t kvh, int64_t k0, float* dk, float* dv,
                      const float* dout, const float* q, const float* k, const float* v, const float* lse,
                      const float* D) {
  const int64_t HD = g.HD, Tq = g.Tq;
  const int64_t cols = k0 + kTileK <= g.Tk ? kTileK : g.Tk - k0;
  float* dK = w.Acc1.data();
  float* dV = w.Acc2.data();
  load_transposed(w.KT.data(), k + b * g.kv_sb + kvh * HD, k0, cols, g.kv_st, HD);
  load_transposed(w.VT.data(), v + b * g.kv_sb + kvh * HD, k0, cols, g.kv_st, HD);
  for (int64_t x = 0; x < cols * HD; ++x) dK[x] = 0.0f, dV[x] = 0.0f;
  const int64_t qlo = g.query_lo(k0), qhi = g.query_hi(k0 + cols);
  for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
    const int64_t bh = (b * g.NH + h) * Tq;
    const int64_t qoff = b * Tq * g.q_st + h * HD;
    for (int64_t q0 = qlo / kTileQ * kTileQ; q0 < qhi; q0 += kTileQ) {
      const int64_t rows = q0 + kTileQ <= Tq ? kTileQ : Tq - q0;
      load_rows(w.Qs.data(), q + qoff, q0, rows, g.q_st, HD, g.scale);
      load_rows(w.dO.data(), dout + qoff, q0, rows, g.q_st, HD, 1.0f);
      tile_grad(w, g, q0, rows, k0, lse + bh + q0, D + bh + q0);
      // dV (cols, HD) += P^T @ dO;  dK (cols, HD) += dS^T @ Qs  (Qs carries the scale)
      mk_gemm(dV, HD, w.S.data(), 1, kTileK, w.dO.data(), HD, cols, rows, HD, true);
      mk_gemm(dK, HD, w.dP.data(), 1, kTileK, w.Qs.data(), HD, cols, rows, HD, true);
    }
  }
  const int64_t dkv_sb = g.Tk * g.kv_st;  // dk, dv are dense
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t o = b * dkv_sb + (k0 + c) * g.kv_st + kvh * HD;
    for (int64_t x = 0; x < HD; ++x) {
      if (dk != nullptr) dk[o + x] = dK[c * HD + x];
      if (dv != nullptr) dv[o + x] = dV[c * HD + x];
    }
  }
}

// Pass 2: dQ of query rows [q0, q0 + kTileQ) of head h.
TROUPE_ATTN_CLONES void backward_q_item(workspace& w, const attn_geom& g, int64_t b, int64_t h, int64_t q0, float* dq,
                     const float* dout, const float* q, const float* k, const float* v, const float* lse,
                     const float* D) {
  const int64_t HD = g.HD, Tq = g.Tq;
  const int64_t rows = q0 + kTileQ <= Tq ? kTileQ : Tq - q0;
  const int64_t kvh = h / g.group;
  const int64_t qoff = b * Tq * g.q_st + h * HD;
  const int64_t bh = (b * g.NH + h) * Tq;
  const float* kb = k + b * g.kv_sb + kvh * HD;
  const float* vb = v + b * g.kv_sb + kvh * HD;
  float* dQ = w.Acc1.data();
  load_rows(w.Qs.data(), q + qoff, q0, rows, g.q_st, HD, g.scale);
  load_rows(w.dO.data(), dout + qoff, q0, rows, g.q_st, HD, 1.0f);
  for (int64_t x = 0; x < rows * HD; ++x) dQ[x] = 0.0f;
  const int64_t klo = g.key_lo(q0), khi = g.key_hi(q0 + rows);
  for (int64_t k0 = klo / kTileK * kTileK; k0 < khi; k0 += kTileK) {
    const int64_t cols = k0 + kTileK <= g.Tk ? kTileK : g.Tk - k0;
    load_transposed(w.KT.data(), kb, k0, cols, g.kv_st, HD);
    load_transposed(w.VT.data(), vb, k0, cols, g.kv_st, HD);
    load_rows(w.KVr.data(), kb, k0, cols, g.kv_st, HD, 1.0f);
    tile_grad(w, g, q0, rows, k0, lse + bh + q0, D + bh + q0);
    // dQ (rows, HD) += dS (rows, cols) @ K (cols, HD)
    mk_gemm(dQ, HD, w.dP.data(), kTileK, 1, w.KVr.data(), HD, rows, cols, HD, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = dq + qoff + (q0 + r) * g.q_st;
    for (int64_t x = 0; x < HD; ++x) o[x] = dQ[r * HD + x] * g.scale;
  }
}
}  // namespace

// q: (B, Tq, NH, HD)  k, v: (B, Tk, NKV, HD) [batch stride kv_stride_b]
//   ->  out: (B, Tq, NH, HD), lse: (B, NH, Tq) nullable
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d) {
  check_dims(d, "attention_forward");
  const attn_geom g = attn_geom::from(d);
  const int64_t n_qt = ceil_div(g.Tq, kTileQ);
  const int64_t n_items = g.B * g.NH * n_qt;
#pragma omp parallel
  {
    workspace w(g.HD);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t qt = n_qt - 1 - item % n_qt;  // longest (latest) query tiles first
      const int64_t h = (item / n_qt) % g.NH;
      const int64_t b = item / (n_qt * g.NH);
      forward_item(w, g, b, h, qt * kTileQ, out, lse, q, k, v);
    }
  }
}

// dout, out: (B, Tq, NH, HD), lse: (B, NH, Tq)  ->  dq: (B, Tq, NH, HD) =,
// dk, dv: (B, Tk, NKV, HD) = (dense, batch stride Tk*NKV*HD)
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const attention_dims& d) {
  check_dims(d, "attention_backward");
  TROUPE_CHECK(d.Tq == d.Tk || d.q_offset >= 0, errc::invalid_argument,
               "attention_backward: needs Tq == Tk (training) or an explicit q_offset, got Tq {} and Tk {}", d.Tq,
               d.Tk);
  TROUPE_CHECK(dout != nullptr && q != nullptr && k != nullptr && v != nullptr && out != nullptr && lse != nullptr,
               errc::invalid_argument, "attention_backward: dout, q, k, v, out and lse (from forward) are required");
  const attn_geom g = attn_geom::from(d);
  const int64_t HD = g.HD, T = g.Tq;
  const int64_t n_qt = ceil_div(T, kTileQ), n_kt = ceil_div(g.Tk, kTileK);

  // D (B, NH, Tq) = rowsum(dout * out)
  std::vector<float> D(static_cast<size_t>(g.B * g.NH * T));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < g.NH; ++h) {
        const int64_t o = (b * T + t) * g.q_st + h * HD;
        float s = 0.0f;
        for (int64_t x = 0; x < HD; ++x) s += dout[o + x] * out[o + x];
        D[(b * g.NH + h) * T + t] = s;
      }

  if (dk != nullptr || dv != nullptr) {
    const int64_t n_items = g.B * g.NKV * n_kt;
#pragma omp parallel
    {
      workspace w(HD);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < n_items; ++item) {
        const int64_t kt = item % n_kt;  // earliest key tiles see the most queries: first
        const int64_t kvh = (item / n_kt) % g.NKV;
        const int64_t b = item / (n_kt * g.NKV);
        backward_kv_item(w, g, b, kvh, kt * kTileK, dk, dv, dout, q, k, v, lse, D.data());
      }
    }
  }
  if (dq != nullptr) {
    const int64_t n_items = g.B * g.NH * n_qt;
#pragma omp parallel
    {
      workspace w(HD);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < n_items; ++item) {
        const int64_t qt = n_qt - 1 - item % n_qt;
        const int64_t h = (item / n_qt) % g.NH;
        const int64_t b = item / (n_qt * g.NH);
        backward_q_item(w, g, b, h, qt * kTileQ, dq, dout, q, k, v, lse, D.data());
      }
    }
  }
}

}  // namespace troupe::kernels::cpu
