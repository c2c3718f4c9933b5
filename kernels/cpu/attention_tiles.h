// kernels/cpu/attention_tiles.h — tile geometry and micro-kernels shared by the CPU
// attention forward and backward (internal to kernels/cpu).
//
//   attn_geom g = attn_geom::from(d);
//   tile_scores(S, Qs, KT, rows);             // S (rows, kTileK) = Qs (rows, HD) @ KT (HD, kTileK)
//   tile_mask(S, g, q0, rows, k0);            // causal / window / past-the-end -> -inf
//
// Invariants:
//   1. Every output element is produced by a fixed sequence of float operations that does
//      not depend on the thread count or on which thread runs the tile (no reductions
//      split across threads, no atomics): results are bitwise reproducible.
//   2. Query row i sits at absolute position off + i (off = q_offset, default Tk - Tq); it
//      sees keys j < Tk with j <= pos and, when window > 0, j > pos - window.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/attention.h"

namespace troupe::kernels::cpu::attn {

constexpr int64_t kTileQ = 64;  // query rows per tile
constexpr int64_t kTileK = 64;  // keys per tile
constexpr int64_t kVec = 16;    // columns a micro-kernel keeps in registers
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct attn_geom {
  int64_t B, Tq, Tk, NH, NKV, HD, group, off, window;
  int64_t q_st;   // token stride of q/out/dout (NH * HD)
  int64_t kv_st;  // token stride of k/v (NKV * HD)
  int64_t kv_sb;  // batch stride of k/v
  float scale;

  static attn_geom from(const attention_dims& d) {
    attn_geom g{};
    g.B = d.B, g.Tq = d.Tq, g.Tk = d.Tk, g.NH = d.NH, g.NKV = d.NKV, g.HD = d.HD;
    g.group = d.NH / d.NKV;
    g.off = d.q_offset >= 0 ? d.q_offset : d.Tk - d.Tq;
    g.window = d.window;
    g.q_st = d.NH * d.HD;
    g.kv_st = d.NKV * d.HD;
    g.kv_sb = d.kv_stride_b > 0 ? d.kv_stride_b : d.Tk * d.NKV * d.HD;
    g.scale = d.scale != 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(d.HD));
    return g;
  }
  // Keys [lo, hi) seen by query rows [q0, q1).
  int64_t key_lo(int64_t q0) const {
    const int64_t p0 = off + q0;
    return window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
  }
  int64_t key_hi(int64_t q1) const { return off + q1 < Tk ? off + q1 : Tk; }
  // Query rows [lo, hi) that see keys [k0, k1).
  int64_t query_lo(int64_t k0) const { return k0 - off > 0 ? k0 - off : 0; }
  int64_t query_hi(int64_t k1) const {
    if (window <= 0) return Tq;
    const int64_t hi = k1 - 1 + window - off;  // pos < j + window for the last key j = k1 - 1
    return hi < Tq ? hi : Tq;
  }
};

// 4 floats as one value (an SSE register; GCC/Clang vector extension). Only elementwise
// mul/add are used, so results are bitwise the same however the compiler lowers them.
typedef float vf4 __attribute__((vector_size(16)));
inline vf4 vload(const float* p) {
  vf4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf4 v) { std::memcpy(p, &v, sizeof v); }

// 16 floats as one value: one AVX-512 register in the avx512 clones of the attention
// functions (attention.cpp, target_clones), four SSE registers otherwise. Only elementwise
// mul/add, and attention.cpp is built with -ffp-contract=off, so every clone computes the
// same bits.
typedef float vf16 __attribute__((vector_size(64)));

// Two output rows at once (they share the loads of m):
//   o_r[0..kVec) = (accumulate ? o_r : 0) + sum_{k<K} c_r[k * cs] * m[k * ms + 0..kVec),  r = 0, 1
inline void mk_rows2(float* o0, float* o1, const float* c0, const float* c1, int64_t cs, const float* m, int64_t ms,
                     int64_t K, bool accumulate) {
  static_assert(kVec == 16, "one vf16 per row");
  vf16 a0, a1;
  if (accumulate) {
    std::memcpy(&a0, o0, sizeof a0);
    std::memcpy(&a1, o1, sizeof a1);
  } else {
    a0 = vf16{} , a1 = vf16{};
  }
  for (int64_t k = 0; k < K; ++k) {
    vf16 mk;
    std::memcpy(&mk, m + k * ms, sizeof mk);
    a0 += c0[k * cs] * mk;
    a1 += c1[k * cs] * mk;
  }
  std::memcpy(o0, &a0, sizeof a0);
  std::memcpy(o1, &a1, sizeof a1);
}

// One output row, ragged width n <= kVec.
inline void mk_row_tail(float* out, const float* coef, int64_t cs, const float* m, int64_t ms, int64_t K,
                        int64_t n, bool accumulate) {
  for (int64_t j = 0; j < n; ++j) {
    float acc = accumulate ? out[j] : 0.0f;
    for (int64_t k = 0; k < K; ++k) acc += coef[k * cs] * m[k * ms + j];
    out[j] = acc;
  }
}

// out (R, W) (+)= coef (R, K) [element (r, k) at coef[r * crs + k * cks]] @ m (K, W) [row stride ms];
// output row stride os. Each output element sums over k in order, whatever the blocking.
inline void mk_gemm(float* out, int64_t os, const float* coef, int64_t crs, int64_t cks, const float* m,
                    int64_t ms, int64_t R, int64_t K, int64_t W, bool accumulate) {
  static_assert(kVec == 16, "mk_rows2 holds 16 columns");
  const int64_t wv = W - W % kVec;
  for (int64_t r = 0; r < R; r += 2) {
    float* o0 = out + r * os;
    const float* c0 = coef + r * crs;
    // An odd last row pairs with itself: same values computed twice, same result.
    float* o1 = r + 1 < R ? o0 + os : o0;
    const float* c1 = r + 1 < R ? c0 + crs : c0;
    for (int64_t j = 0; j < wv; j += kVec) {
      if (o1 == o0) {
        float tmp[kVec];  // a discard row
        std::memcpy(tmp, o0 + j, sizeof tmp);
        mk_rows2(o0 + j, tmp, c0, c0, cks, m + j, ms, K, accumulate);
      } else {
        mk_rows2(o0 + j, o1 + j, c0, c1, cks, m + j, ms, K, accumulate);
      }
    }
    if (wv < W) {
      mk_row_tail(o0 + wv, c0, cks, m + wv, ms, K, W - wv, accumulate);
      if (o1 != o0) mk_row_tail(o1 + wv, c1, cks, m + wv, ms, K, W - wv, accumulate);
    }
  }
}

// exp(x) for the softmax, where x = score - (max or lse) <= ~0: Cephes' expf (about 1 ulp)
// on 4 lanes, in plain float arithmetic (explicit vectors: the compiler will not if-convert
// the clamps itself under -ftrapping-math); no libm call, so the result does not depend on
// the vector width or the C library.
// Arguments below -87 (including the mask's -inf) give exactly 0.
typedef int32_t vi4 __attribute__((vector_size(16)));
inline vf4 vsplat(float x) { return vf4{x, x, x, x}; }
inline vf4 softmax_exp4(vf4 x) {
  const vf4 lo = vsplat(-87.0f), hi = vsplat(88.0f);
  vf4 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf4 round_magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf4 n = (xc * vsplat(1.44269504088896341f) + round_magic) - round_magic;
  const vf4 r = (xc - n * vsplat(0.693359375f)) - n * vsplat(-2.12194440e-4f);
  vf4 p = vsplat(1.9875691500e-4f);
  p = p * r + vsplat(1.3981999507e-3f);
  p = p * r + vsplat(8.3334519073e-3f);
  p = p * r + vsplat(4.1665795894e-2f);
  p = p * r + vsplat(1.6666665459e-1f);
  p = p * r + vsplat(5.0000001201e-1f);
  const vf4 y = p * (r * r) + r + vsplat(1.0f);
  const vi4 e = (__builtin_convertvector(n, vi4) + 127) << 23;
  vf4 two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return x < lo ? vsplat(0.0f) : y * two_n;
}

// max over s[0..kTileK) (-inf when all are masked).
inline float row_max(const float* s) {
  vf4 m0 = vsplat(kNegInf), m1 = vsplat(kNegInf);
  for (int64_t c = 0; c < kTileK; c += 8) {
    const vf4 a = vload(s + c), b = vload(s + c + 4);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  const vf4 m = m0 > m1 ? m0 : m1;
  const float x = m[0] > m[1] ? m[0] : m[1], y = m[2] > m[3] ? m[2] : m[3];
  return x > y ? x : y;
}

// s[c] = exp(s[c] - shift) for c < kTileK; returns their sum, added in 8 fixed lanes.
inline float exp_row_sum(float* s, float shift) {
  static_assert(kTileK % 8 == 0);
  const vf4 sh = vsplat(shift);
  vf4 l0 = vsplat(0.0f), l1 = vsplat(0.0f);
  for (int64_t c = 0; c < kTileK; c += 8) {
    const vf4 e0 = softmax_exp4(vload(s + c) - sh), e1 = softmax_exp4(vload(s + c + 4) - sh);
    vstore(s + c, e0), vstore(s + c + 4, e1);
    l0 += e0, l1 += e1;
  }
  const vf4 l = l0 + l1;
  return (l[0] + l[1]) + (l[2] + l[3]);
}

// Backward: p[c] = exp(s[c] - lse); dp[c] = p[c] * (dp[c] - D), c < kTileK, in place.
inline void probs_and_dscores(float* s, float* dp, float lse, float D) {
  const vf4 l = vsplat(lse), d = vsplat(D);
  for (int64_t c = 0; c < kTileK; c += 4) {
    const vf4 p = softmax_exp4(vload(s + c) - l);
    vstore(s + c, p);
    vstore(dp + c, p * (vload(dp + c) - d));
  }
}

// S (rows, kTileK) = A (rows, HD) @ BT (HD, kTileK)   [QK^T with K packed transposed]
inline void tile_scores(float* S, const float* A, const float* BT, int64_t rows, int64_t HD) {
  mk_gemm(S, kTileK, A, HD, 1, BT, kTileK, rows, HD, kTileK, false);
}

// Masks the tile of query rows [q0, q0 + rows) x keys [k0, k0 + kTileK): keys past the
// query's position, before its window, or past Tk become -inf.
inline void tile_mask(float* S, const attn_geom& g, int64_t q0, int64_t rows, int64_t k0) {
  const int64_t p0 = g.off + q0, p1 = g.off + q0 + rows - 1;
  const bool full = k0 + kTileK - 1 <= p0 && k0 + kTileK <= g.Tk && (g.window <= 0 || k0 > p1 - g.window);
  if (full) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = p0 + r;
    const int64_t lo = g.window > 0 ? p - g.window + 1 : INT64_MIN;
    float* s = S + r * kTileK;
    for (int64_t c = 0; c < kTileK; ++c) {
      const int64_t j = k0 + c;
      if (j > p || j < lo || j >= g.Tk) s[c] = kNegInf;
    }
  }
}

// Packs rows [t0, t0 + n) of one head of a token-major tensor into dst (n, HD), times mul.
inline void load_rows(float* dst, const float* src, int64_t t0, int64_t n, int64_t tok_stride, int64_t HD,
                      float mul) {
  for (int64_t r = 0; r < n; ++r) {
    const float* s = src + (t0 + r) * tok_stride;
    float* d = dst + r * HD;
    for (int64_t x = 0; x < HD; ++x) d[x] = s[x] * mul;
  }
}

// Packs keys [k0, k0 + n) of one KV head transposed: dst (HD, kTileK), columns >= n zeroed.
inline void load_transposed(float* dst, const float* src, int64_t k0, int64_t n, int64_t tok_stride,
                            int64_t HD) {
  for (int64_t c = 0; c < kTileK; ++c) {
    if (c < n) {
      const float* s = src + (k0 + c) * tok_stride;
      for (int64_t x = 0; x < HD; ++x) dst[x * kTileK + c] = s[x];
    } else {
      for (int64_t x = 0; x < HD; ++x) dst[x * kTileK + c] = 0.0f;
    }
  }
}

}  // namespace troupe::kernels::cpu::attn
