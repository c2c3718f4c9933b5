// kernels/cuda/attention.cu — causal GQA attention forward on the device, tiled with an
// online softmax (FlashAttention-2 style, fp32): one block per (query tile, head, batch),
// keys and values streamed through shared memory in tiles of 32; never a Tq x Tk matrix.
#include <algorithm>
#include <cmath>

#include "kernels/attention.h"
#include "kernels/cuda/common.cuh"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

constexpr int kBK = 32;            // keys per tile = one per lane when scoring
constexpr int kWarps = 4;          // warps per block
constexpr int kRowsPerWarp = 4;    // query rows per warp
constexpr int kBQ = kWarps * kRowsPerWarp;

struct attn_args {
  int64_t Tq, Tk, NH, NKV, HD, window, kv_stride_b;
  float scale;
};

size_t attention_smem_bytes(int64_t HD) {
  // Qs (BQ, HD) + Ks (BK, HD + 1, padded against bank conflicts) + Vs (BK, HD) + Ps (warps, BK)
  return sizeof(float) * static_cast<size_t>(kBQ * HD + kBK * (HD + 1) + kBK * HD + kWarps * kBK);
}

// DPL = head dims per lane in the output accumulator (HD <= 32 * DPL).
//   Scoring: lane j scores key kt + j against the row's query (full dot from shared memory).
//   Update:  lane owns dims d = lane + 32 t, acc = acc * corr + sum_j p_j v_j[d].
template <int DPL>
__global__ void __launch_bounds__(kWarps * 32)
    attention_forward_kernel(float* out, float* lse, const float* q, const float* k, const float* v, attn_args a) {
  extern __shared__ float smem[];
  const int HD = static_cast<int>(a.HD);
  float* Qs = smem;
  float* Ks = Qs + kBQ * HD;
  float* Vs = Ks + kBK * (HD + 1);
  float* Ps = Vs + kBK * HD;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const int64_t kvh = h / (a.NH / a.NKV);
  const int64_t q_tok_stride = a.NH * a.HD, kv_tok_stride = a.NKV * a.HD;
  const float* qb = q + b * a.Tq * q_tok_stride + h * a.HD;  // q[b, t, h, :] = qb + t * q_tok_stride
  const float* kb = k + b * a.kv_stride_b + kvh * a.HD;      // k[b, j, kvh, :] = kb + j * kv_tok_stride
  const float* vb = v + b * a.kv_stride_b + kvh * a.HD;

  for (int i = threadIdx.x; i < kBQ * HD; i += blockDim.x) {
    const int r = i / HD, d = i - r * HD;
    const int64_t t = q0 + r;
    Qs[i] = t < a.Tq ? qb[t * q_tok_stride + d] : 0.0f;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[rr][t] = 0.0f;
  }

  // Query row i sits at absolute position offset + i; keys [k_begin, k_end) cover the tile.
  const int64_t offset = a.Tk - a.Tq;
  const int64_t q_last = (q0 + kBQ < a.Tq ? q0 + kBQ : a.Tq) - 1;
  const int64_t k_end = offset + q_last + 1 < a.Tk ? offset + q_last + 1 : a.Tk;
  const int64_t k_first = offset + q0 - a.window + 1;
  const int64_t k_begin = a.window > 0 && k_first > 0 ? k_first : 0;

  for (int64_t kt = k_begin; kt < k_end; kt += kBK) {
    __syncthreads();  // the previous tile is consumed (and Qs is loaded, on the first pass)
    for (int i = threadIdx.x; i < kBK * HD; i += blockDim.x) {
      const int j = i / HD, d = i - j * HD;
      const int64_t kj = kt + j;
      float kv = 0.0f, vv = 0.0f;
      if (kj < a.Tk) {
        kv = kb[kj * kv_tok_stride + d];
        vv = vb[kj * kv_tok_stride + d];
      }
      Ks[j * (HD + 1) + d] = kv;
      Vs[j * HD + d] = vv;
    }
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t qi = q0 + r;
      if (qi >= a.Tq) continue;  // uniform across the warp
      const int64_t pos = offset + qi;
      const int64_t kj = kt + lane;
      const bool valid = kj < a.Tk && kj <= pos && (a.window <= 0 || kj > pos - a.window);
      float s = -INFINITY;
      if (valid) {
        const float* qr = Qs + r * HD;
        const float* kr = Ks + lane * (HD + 1);
        float dot = 0.0f;
        for (int d = 0; d < HD; ++d) dot += qr[d] * kr[d];
        s = dot * a.scale;
      }
      const float tile_max = warp_max(s);
      if (tile_max == -INFINITY) continue;  // no visible key in this tile for this row (uniform)
      const float m_new = fmaxf(m[rr], tile_max);
      const float corr = expf(m[rr] - m_new);  // 0 for the first visible tile
      const float p = valid ? expf(s - m_new) : 0.0f;
      l[rr] = l[rr] * corr + warp_sum(p);
      m[rr] = m_new;
      Ps[warp * kBK + lane] = p;
      __syncwarp();
#pragma unroll
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        float x = acc[rr][t] * corr;
        if (d < HD) {
#pragma unroll 8
          for (int jj = 0; jj < kBK; ++jj) x += Ps[warp * kBK + jj] * Vs[jj * HD + d];
        }
        acc[rr][t] = x;
      }
      __syncwarp();  // Ps is rewritten by the next row
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t qi = q0 + warp * kRowsPerWarp + rr;
    if (qi >= a.Tq) continue;
    const float inv_l = 1.0f / l[rr];
    float* o = out + (b * a.Tq + qi) * q_tok_stride + h * a.HD;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < HD) o[d] = acc[rr][t] * inv_l;
    }
    if (lse != nullptr && lane == 0) lse[(b * a.NH + h) * a.Tq + qi] = m[rr] + logf(l[rr]);
  }
}

template <int DPL>
void launch_attention(float* out, float* lse, const float* q, const float* k, const float* v, const attn_args& a,
                      int64_t B, cudaStream_t stream) {
  const size_t smem = attention_smem_bytes(a.HD);
  if (smem > 48 * 1024)
    TROUPE_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<DPL>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((a.Tq + kBQ - 1) / kBQ), static_cast<unsigned>(a.NH),
                  static_cast<unsigned>(B));
  attention_forward_kernel<DPL><<<grid, kWarps * 32, smem, stream>>>(out, lse, q, k, v, a);
  TROUPE_CUDA_CHECK_LAUNCH();
}
}  // namespace

// q: (B, Tq, NH, HD)  k, v: (B, Tk, NKV, HD), batch stride kv_stride_b  ->  out: (B, Tq, NH, HD),
// lse: (B, NH, Tq) nullable
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const attention_dims& d, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(d.B >= 0 && d.Tq >= 0 && d.Tk >= d.Tq && d.NH > 0 && d.NKV > 0 && d.HD > 0, errc::invalid_argument,
               "cuda::attention_forward: need B >= 0, 0 <= Tq <= Tk, NH, NKV, HD > 0; got B={} Tq={} Tk={} NH={} "
               "NKV={} HD={}",
               d.B, d.Tq, d.Tk, d.NH, d.NKV, d.HD);
  TROUPE_CHECK(d.NH % d.NKV == 0, errc::invalid_argument,
               "cuda::attention_forward: NH={} must be a multiple of NKV={}", d.NH, d.NKV);
  TROUPE_CHECK(d.HD <= 256, errc::unsupported,
               "cuda::attention_forward: head_dim {} exceeds the device kernel's limit of 256", d.HD);
  TROUPE_CHECK(d.window >= 0, errc::invalid_argument, "cuda::attention_forward: window {} must be >= 0", d.window);
  const int64_t min_stride = d.Tk * d.NKV * d.HD;
  const int64_t kv_stride = d.kv_stride_b == 0 ? min_stride : d.kv_stride_b;
  TROUPE_CHECK(kv_stride >= min_stride, errc::invalid_argument,
               "cuda::attention_forward: kv_stride_b {} is smaller than Tk*NKV*HD = {}", kv_stride, min_stride);
  TROUPE_CHECK(d.B <= 65535 && d.NH <= 65535, errc::unsupported,
               "cuda::attention_forward: B={} and NH={} must be <= 65535 (grid limits)", d.B, d.NH);
  if (d.B == 0 || d.Tq == 0) return;
  attn_args a{d.Tq, d.Tk, d.NH, d.NKV, d.HD, d.window, kv_stride,
              d.scale != 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(d.HD))};
  cudaStream_t s = as_stream(stream);
  if (d.HD <= 64)
    launch_attention<2>(out, lse, q, k, v, a, d.B, s);
  else if (d.HD <= 128)
    launch_attention<4>(out, lse, q, k, v, a, d.B, s);
  else
    launch_attention<8>(out, lse, q, k, v, a, d.B, s);
}

}  // namespace troupe::kernels::cuda
