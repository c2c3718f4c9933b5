// kernels/cuda/moe.cu — MoE router (softmax + top-k, one warp per token) and the
// permute / unpermute gathers on the device. The permutation plan itself is computed
// on the host (cpu::moe_permute_plan) and copied over.
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/moe.h"

namespace troupe::kernels::cuda {

namespace {
using namespace cuda_detail;

constexpr int kMaxTopK = 8;
constexpr int kRouterWarps = 4;  // tokens per block

// logits: (N, E)  ->  probs: (N, E), topk_idx, topk_w: (N, K). Same order as the cpu op:
// descending probability, the lower expert id first on ties; K <= kMaxTopK.
__global__ void moe_router_kernel(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N,
                                  int E, int K, bool normalize) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRouterWarps + (threadIdx.x >> 5);
  if (row >= N) return;  // the whole warp leaves together
  const float* l = logits + row * E;
  float* p = probs + row * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) sum += expf(l[e] - mx);
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int e = lane; e < E; e += 32) p[e] = expf(l[e] - mx) * inv;  // each lane rereads only its own p[e]

  int sel[kMaxTopK];
  float selw[kMaxTopK];
  float wsum = 0.0f;
  for (int k = 0; k < K; ++k) {
    float best_v = -1.0f;  // probabilities are >= 0
    int best_e = INT_MAX;
    for (int e = lane; e < E; e += 32) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= sel[j] == e;
      const float v = p[e];
      if (!taken && (v > best_v || (v == best_v && e < best_e))) {
        best_v = v;
        best_e = e;
      }
    }
    // Butterfly arg-max under a strict total order: every lane ends with the same winner.
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ov > best_v || (ov == best_v && oe < best_e)) {
        best_v = ov;
        best_e = oe;
      }
    }
    sel[k] = best_e;
    selw[k] = best_v;
    wsum += best_v;  // k order, as the cpu op
  }
  if (lane == 0) {
    const float winv = 1.0f / wsum;
    for (int k = 0; k < K; ++k) {
      topk_idx[row * K + k] = sel[k];
      topk_w[row * K + k] = normalize ? selw[k] * winv : selw[k];
    }
  }
}

// x: (N, C)  ->  xp: (N*K, C), xp[s] = x[slot_row[s] / K]
__global__ void moe_permute_kernel(float* xp, const float* x, const int32_t* slot_row, int64_t NK, int64_t K,
                                   int64_t C) {
  const int64_t total = NK * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t s = i / C, c = i - s * C;
    xp[i] = x[static_cast<int64_t>(slot_row[s] / K) * C + c];
  }
}

// yp: (N*K, C)  topk_w: (N, K)  ->  out: (N, C), summed in k order.
__global__ void moe_unpermute_kernel(float* out, const float* yp, const float* topk_w, const int32_t* row_slot,
                                     int64_t N, int64_t K, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t n = i / C, c = i - n * C;
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k)
      acc += topk_w[n * K + k] * yp[static_cast<int64_t>(row_slot[n * K + k]) * C + c];
    out[i] = acc;
  }
}
}  // namespace

void moe_router_forward(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N, int64_t E,
                        int64_t K, bool normalize, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && E > 0 && E <= INT_MAX, errc::invalid_argument,
               "cuda::moe_router_forward: need N >= 0 and 0 < E < 2^31, got N={} E={}", N, E);
  TROUPE_CHECK(K >= 1 && K <= E, errc::invalid_argument, "cuda::moe_router_forward: top-k K={} must be in [1, E={}]",
               K, E);
  TROUPE_CHECK(K <= kMaxTopK, errc::unsupported,
               "cuda::moe_router_forward: top-k K={} exceeds the device kernel's limit of {}; route on the cpu", K,
               kMaxTopK);
  if (N == 0) return;
  const int64_t blocks = (N + kRouterWarps - 1) / kRouterWarps;
  TROUPE_CHECK(blocks <= INT_MAX, errc::invalid_argument, "cuda::moe_router_forward: N={} exceeds the grid", N);
  moe_router_kernel<<<static_cast<unsigned>(blocks), 32 * kRouterWarps, 0, as_stream(stream)>>>(
      probs, topk_idx, topk_w, logits, N, static_cast<int>(E), static_cast<int>(K), normalize);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void moe_permute(float* xp, const float* x, const int32_t* slot_row, int64_t NK, int64_t K, int64_t C, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(NK >= 0 && K >= 1 && C >= 0 && NK % K == 0, errc::invalid_argument,
               "cuda::moe_permute: need NK >= 0 a multiple of K >= 1 and C >= 0, got NK={} K={} C={}", NK, K, C);
  if (NK * C == 0) return;
  moe_permute_kernel<<<grid_for(NK * C, 256), 256, 0, as_stream(stream)>>>(xp, x, slot_row, NK, K, C);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void moe_unpermute(float* out, const float* yp, const float* topk_w, const int32_t* row_slot, int64_t N, int64_t K,
                   int64_t C, void* stream) {
  using runtime::errc;
  TROUPE_CHECK(N >= 0 && K >= 1 && C >= 0, errc::invalid_argument,
               "cuda::moe_unpermute: need N >= 0, K >= 1, C >= 0, got N={} K={} C={}", N, K, C);
  if (N * C == 0) return;
  moe_unpermute_kernel<<<grid_for(N * C, 256), 256, 0, as_stream(stream)>>>(out, yp, topk_w, row_slot, N, K, C);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::kernels::cuda
