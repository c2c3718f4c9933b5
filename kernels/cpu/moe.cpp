// kernels/cpu/moe.cpp — MoE router (softmax + top-k), token permutation and the grouped
// SwiGLU expert FFN on the cpu (OpenBLAS sgemm per expert, OpenMP elsewhere).
#include "kernels/moe.h"

#include "kernels/cpu/blas.h"
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "runtime/error.h"

namespace troupe::kernels::cpu {

namespace {
using runtime::errc;

void check_router_dims(const char* op, int64_t N, int64_t E, int64_t K) {
  TROUPE_CHECK(N >= 0 && E > 0, errc::invalid_argument, "{}: need N >= 0 and E > 0, got N={} E={}", op, N, E);
  TROUPE_CHECK(K >= 1 && K <= E, errc::invalid_argument, "{}: top-k K={} must be in [1, E={}]", op, K, E);
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Rows of expert e, checked: offsets must be non-decreasing from offsets[0].
inline int64_t expert_rows(const int32_t* offsets, int64_t e) {
  int64_t rows = static_cast<int64_t>(offsets[e + 1]) - offsets[e];
  TROUPE_CHECK(rows >= 0, errc::invalid_argument,
               "moe_expert_ffn: expert_offsets must be non-decreasing, offsets[{}]={} > offsets[{}]={}", e,
               offsets[e], e + 1, offsets[e + 1]);
  return rows;
}

int64_t max_expert_rows(const int32_t* offsets, int64_t E) {
  TROUPE_CHECK(offsets[0] >= 0, errc::invalid_argument, "moe_expert_ffn: expert_offsets[0]={} must be >= 0",
               offsets[0]);
  int64_t m = 0;
  for (int64_t e = 0; e < E; ++e) m = std::max(m, expert_rows(offsets, e));
  return m;
}
}  // namespace

// ---- router ---------------------------------------------------------------------------

// logits: (N, E)  ->  probs: (N, E), topk_idx: (N, K), topk_w: (N, K)
void moe_router_forward(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N, int64_t E,
                        int64_t K, bool normalize) {
  check_router_dims("moe_router_forward", N, E, K);
#pragma omp parallel
  {
    std::vector<int32_t> order(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* l = logits + n * E;
      float* p = probs + n * E;
      float mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(l[e] - mx);
        sum += p[e];
      }
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < E; ++e) p[e] *= inv;
      // Top-k: descending probability, the lower expert id first on ties.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      float wsum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        topk_idx[n * K + k] = order[static_cast<size_t>(k)];
        topk_w[n * K + k] = p[order[static_cast<size_t>(k)]];
        wsum += topk_w[n * K + k];
      }
      if (normalize) {
        const float winv = 1.0f / wsum;
        for (int64_t k = 0; k < K; ++k) topk_w[n * K + k] *= winv;
      }
    }
  }
}

// dtopk_w: (N, K)  ->  dlogits: (N, E) =
void moe_router_backward(float* dlogits, const float* dtopk_w, const float* probs, const int32_t* topk_idx,
                         const float* topk_w, int64_t N, int64_t E, int64_t K, bool normalize) {
  check_router_dims("moe_router_backward", N, E, K);
#pragma omp parallel
  {
    std::vector<float> dp(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* p = probs + n * E;
      const int32_t* idx = topk_idx + n * K;
      const float* dw = dtopk_w + n * K;
      // d(topk_w) -> d(probs at the chosen experts). With normalisation
      // w_k = p_k / S, S = sum_j p_j:  dp_k = (dw_k - sum_j dw_j w_j) / S.
      if (normalize) {
        float S = 0.0f, dot = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          S += p[idx[k]];
          dot += dw[k] * topk_w[n * K + k];
        }
        for (int64_t k = 0; k < K; ++k) dp[static_cast<size_t>(k)] = (dw[k] - dot) / S;
      } else {
        for (int64_t k = 0; k < K; ++k) dp[static_cast<size_t>(k)] = dw[k];
      }
      // Softmax backward with a K-sparse dp: dlogit_e = p_e (dp_e - sum_k dp_k p_k).
      float dsum = 0.0f;
      for (int64_t k = 0; k < K; ++k) dsum += dp[static_cast<size_t>(k)] * p[idx[k]];
      float* dl = dlogits + n * E;
      for (int64_t e = 0; e < E; ++e) dl[e] = -p[e] * dsum;
      for (int64_t k = 0; k < K; ++k) dl[idx[k]] += p[idx[k]] * dp[static_cast<size_t>(k)];
    }
  }
}

// ---- permutation ----------------------------------------------------------------------

// topk_idx: (N, K)  ->  expert_offsets: (E + 1), row_slot: (N*K), slot_row: (N*K)
void moe_permute_plan(int32_t* expert_offsets, int32_t* row_slot, int32_t* slot_row, const int32_t* topk_idx,
                      int64_t N, int64_t E, int64_t K) {
  check_router_dims("moe_permute_plan", N, E, K);
  const int64_t NK = N * K;
  TROUPE_CHECK(NK <= INT32_MAX, errc::invalid_argument, "moe_permute_plan: N*K={} does not fit int32 slots", NK);
  std::vector<int32_t> count(static_cast<size_t>(E), 0);
  for (int64_t r = 0; r < NK; ++r) {
    const int32_t e = topk_idx[r];
    TROUPE_CHECK(e >= 0 && e < E, errc::out_of_range,
                 "moe_permute_plan: expert id {} at token {} choice {} is outside [0, {}); check the router output",
                 e, r / K, r % K, E);
    ++count[static_cast<size_t>(e)];
  }
  expert_offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) expert_offsets[e + 1] = expert_offsets[e] + count[static_cast<size_t>(e)];
  // Rows are visited in (token, k) order, so each expert's slots keep that order.
  std::vector<int32_t> cursor(expert_offsets, expert_offsets + E);
  for (int64_t r = 0; r < NK; ++r) {
    const int32_t s = cursor[static_cast<size_t>(topk_idx[r])]++;
    row_slot[r] = s;
    slot_row[s] = static_cast<int32_t>(r);
  }
}

// x: (N, C)  ->  xp: (N*K, C), xp[s] = x[slot_row[s] / K]
void moe_permute(float* xp, const float* x, const int32_t* slot_row, int64_t NK, int64_t K, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < NK; ++s) {
    const float* src = x + static_cast<int64_t>(slot_row[s] / K) * C;
    std::copy(src, src + C, xp + s * C);
  }
}

// dxp: (N*K, C)  ->  dx: (N, C) =, dx[n] = sum_k dxp[row_slot[n*K+k]] (k order)
void moe_permute_backward(float* dx, const float* dxp, const int32_t* row_slot, int64_t N, int64_t K, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float* d = dx + n * C;
    std::fill(d, d + C, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float* src = dxp + static_cast<int64_t>(row_slot[n * K + k]) * C;
      for (int64_t c = 0; c < C; ++c) d[c] += src[c];
    }
  }
}

// yp: (N*K, C)  topk_w: (N, K)  ->  out: (N, C) =
void moe_unpermute(float* out, const float* yp, const float* topk_w, const int32_t* row_slot, int64_t N, int64_t K,
                   int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float* o = out + n * C;
    std::fill(o, o + C, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float w = topk_w[n * K + k];
      const float* src = yp + static_cast<int64_t>(row_slot[n * K + k]) * C;
      for (int64_t c = 0; c < C; ++c) o[c] += w * src[c];
    }
  }
}

// dout: (N, C)  ->  dyp: (N*K, C) =, dtopk_w: (N, K) =
void moe_unpermute_backward(float* dyp, float* dtopk_w, const float* dout, const float* yp, const float* topk_w,
                            const int32_t* row_slot, int64_t N, int64_t K, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* g = dout + n * C;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t s = row_slot[n * K + k];
      const float w = topk_w[n * K + k];
      const float* y = yp + s * C;
      float* dy = dyp + s * C;
      float dot = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        dy[c] = w * g[c];
        dot += g[c] * y[c];
      }
      dtopk_w[n * K + k] = dot;
    }
  }
}

// ---- grouped expert FFN ---------------------------------------------------------------

// xp: (R, C)  ->  yp: (R, C), h_gate, h_up: (R, I)
void moe_expert_ffn_forward(float* yp, float* h_gate, float* h_up, const float* xp, const float* const* w_gate,
                            const float* const* w_up, const float* const* w_down, const int32_t* expert_offsets,
                            int64_t E, int64_t C, int64_t I) {
  TROUPE_CHECK(E > 0 && C > 0 && I > 0, errc::invalid_argument,
               "moe_expert_ffn_forward: E={} C={} I={} must all be > 0", E, C, I);
  max_expert_rows(expert_offsets, E);  // checks the offsets
  std::vector<float> act(static_cast<size_t>(moe_row_tile * I));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = expert_rows(expert_offsets, e);
    if (rows == 0) continue;
    TROUPE_CHECK(w_gate[e] && w_up[e] && w_down[e], errc::invalid_argument,
                 "moe_expert_ffn_forward: expert {} has {} rows but a null weight pointer", e, rows);
    // Tiles of moe_row_tile rows from the expert's first row (invariant 5).
    for (int64_t t0 = 0; t0 < rows; t0 += moe_row_tile) {
      const int64_t m = std::min(moe_row_tile, rows - t0), r0 = expert_offsets[e] + t0;
      const float* x = xp + r0 * C;
      float* hg = h_gate + r0 * I;
      float* hu = h_up + r0 * I;
      // h = x (m, C) · W^T (C, I)
      sgemm(false, true, m, I, C, 1.0f, x, C, w_gate[e], C, 0.0f, hg, I);
      sgemm(false, true, m, I, C, 1.0f, x, C, w_up[e], C, 0.0f, hu, I);
      const int64_t n = m * I;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) act[i] = hg[i] * sigmoidf(hg[i]) * hu[i];
      // y = a (m, I) · Wd^T (I, C)
      sgemm(false, true, m, C, I, 1.0f, act.data(), I, w_down[e], I, 0.0f, yp + r0 * C, C);
    }
  }
}

// dyp: (R, C)  ->  dxp: (R, C) =, dw_gate[e], dw_up[e]: (I, C) +=, dw_down[e]: (C, I) +=
void moe_expert_ffn_backward(float* dxp, float* const* dw_gate, float* const* dw_up, float* const* dw_down,
                             const float* dyp, const float* xp, const float* h_gate, const float* h_up,
                             const float* const* w_gate, const float* const* w_up, const float* const* w_down,
                             const int32_t* expert_offsets, int64_t E, int64_t C, int64_t I) {
  TROUPE_CHECK(E > 0 && C > 0 && I > 0, errc::invalid_argument,
               "moe_expert_ffn_backward: E={} C={} I={} must all be > 0", E, C, I);
  max_expert_rows(expert_offsets, E);  // checks the offsets
  std::vector<float> act(static_cast<size_t>(moe_row_tile * I));   // a, then d(h_up)
  std::vector<float> dgate(static_cast<size_t>(moe_row_tile * I));  // d(a), then d(h_gate)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = expert_rows(expert_offsets, e);
    if (rows == 0) continue;
    TROUPE_CHECK(w_gate[e] && w_up[e] && w_down[e], errc::invalid_argument,
                 "moe_expert_ffn_backward: expert {} has {} rows but a null weight pointer", e, rows);
    // Tiles as in forward; the weight gradients accumulate tile after tile (invariant 5).
    for (int64_t t0 = 0; t0 < rows; t0 += moe_row_tile) {
      const int64_t m = std::min(moe_row_tile, rows - t0), r0 = expert_offsets[e] + t0;
      const float* x = xp + r0 * C;
      const float* dy = dyp + r0 * C;
      const float* hg = h_gate + r0 * I;
      const float* hu = h_up + r0 * I;
      const int64_t n = m * I;
      float* a = act.data();
      float* da = dgate.data();
      // da = dy (m, C) · Wd (C, I)
      sgemm(false, false, m, I, C, 1.0f, dy, C, w_down[e], I, 0.0f, da, I);
      if (dw_down && dw_down[e]) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) a[i] = hg[i] * sigmoidf(hg[i]) * hu[i];
        // dWd (C, I) += dy^T (C, m) · a (m, I)
        sgemm(true, false, C, I, m, 1.0f, dy, C, a, I, 1.0f, dw_down[e], I);
      }
      // SwiGLU backward: a = silu(g) * u;  dg = da * u * s (1 + g (1 - s)),  du = da * silu(g).
      float* dhu = a;
      float* dhg = da;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float g = hg[i], s = sigmoidf(g), d = da[i];
        dhu[i] = d * g * s;
        dhg[i] = d * hu[i] * s * (1.0f + g * (1.0f - s));
      }
      // dx = dhg (m, I) · Wg (I, C) + dhu · Wu
      float* dx = dxp + r0 * C;
      sgemm(false, false, m, C, I, 1.0f, dhg, I, w_gate[e], C, 0.0f, dx, C);
      sgemm(false, false, m, C, I, 1.0f, dhu, I, w_up[e], C, 1.0f, dx, C);
      // dWg (I, C) += dhg^T (I, m) · x (m, C); same for Wu.
      if (dw_gate && dw_gate[e]) sgemm(true, false, I, C, m, 1.0f, dhg, I, x, C, 1.0f, dw_gate[e], C);
      if (dw_up && dw_up[e]) sgemm(true, false, I, C, m, 1.0f, dhu, I, x, C, 1.0f, dw_up[e], C);
    }
  }
}

}  // namespace troupe::kernels::cpu
