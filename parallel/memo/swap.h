// parallel/memo/swap.h — MEMO's token-wise activation swapping + recomputation (SIGMOD 2025,
// arXiv 2407.12117; ../shared/ALGORITHMS.md): between a layer's forward and its backward the
// layer's saved activations (layer_activations) leave the device. x_in, att and lse go to host
// whole; of the other skeletal tensors the first round(α·N) token rows go to host and the rest
// are dropped and recomputed before the layer's backward.
//
//   memo::memo_swap swap({.alpha = 0.5, .keep_last_layers = 2, .copy_bandwidth_gbps = 12});
//   fb_options o;
//   o.memo = &swap;
//   float loss = dec.forward_backward(ids, targets, B, T, grads, o);  // bitwise == memo off
//   swap.stats().device_bytes_resident;  // activation bytes left on the device after forward
//   memo::memo_swap ckpt({.full_recompute = true});  // baseline: keep x_in, rerun each layer's forward
//
// Invariants:
//   1. Layers l < L - keep_last_layers are swapped; the last keep_last_layers stay on the device.
//      A swapped layer's layer_activations are empty (0 bytes) from the end of its forward until
//      its prefetched copy is restored right before its backward, and empty again after it.
//   2. Gradients and loss are bitwise equal to the same call with memo off, for every α in [0, 1].
//      Recomputation computes only the dropped rows [n0, N), n0 = round(α·N), in place: row-wise
//      ops (rmsnorm, rope, swiglu, the residual add) run on those rows, and each matmul runs
//      matmul_forward_rows, the forward's own sgemm blocks of the full N-row shape from the block
//      holding row n0 (kernels/matmul.h invariant 3, kernels/cpu/blas.h invariant 4). That block
//      may start below n0 (row 0 when sgemm does not split the shape by rows): its restored rows
//      are rewritten with the same bits, and stats().recomputed_rows counts them.
//   3. Copies run on two threads (device->host, host->device) fenced by futures. Two staging
//      ("rounding") buffers alternate between even and odd layers: layer l's forward reuses the
//      buffers of layer l-2 only after their device->host copy finished; after layer l's backward
//      its buffers become the target of layer l-2's prefetch, which starts then (paper's i+2 rule).
//   4. Host buffers are allocated at the first swap-out of a layer and reused while the shapes
//      stay the same (a fixed (B, T) job allocates once).
//   5. MoE layers are swapped whole (every tensor, no token split, no recomputation); their small
//      routing index vectors (offsets, row_slot, slot_row) stay on the device.
//   6. copy_bandwidth_gbps > 0 caps each copy thread at that many 1e9 bytes/s (models PCIe).
//   7. One engine serves one decoder on one thread at a time; forward_loss does not use it.
//   8. full_recompute (the Megatron-style baseline: per-layer activation checkpointing): no host
//      copies and no copy threads; α and copy_bandwidth_gbps are unused. After a swapped layer's
//      forward only x_in stays in its layer_activations, on the device; every other tensor is
//      dropped, the MoE routing vectors included (layer_forward rebuilds them). Before the layer's
//      backward its whole forward runs again (layer_forward, cache = nullptr, the decoder's
//      geometry, context parallelism included) from a copy of x_in into the same
//      layer_activations, so gradients are bitwise those of memo off (same kernels, same shapes).
//      After the layer's backward its layer_activations are emptied. stats: swapped_layers = the
//      recomputed layers, swapped_tokens = 0, recomputed_rows = N per recomputed layer, host and
//      copy bytes 0, device_bytes_resident = x_in of each recomputed layer + the kept layers.
//      Under context parallelism the rerun repeats the forward's ring exchange. plan_step plans
//      such a step flat, not bi-level: the first tensor dropped after a recomputed layer's
//      forward_end mark is freed at that mark's tick, so it counts as one of that layer's forward
//      transients and recomputed and kept layers differ (arena.h invariant 5).
//
//   9. With fb_options::arena (arena.h) every device tensor here (rounding buffers, prefetch
//      targets) comes from the step arena; end_backward() releases the rounding buffers, so no
//      activation outlives the step. α is given here; memory_plan.h measures it (alpha.h).
//  10. With memo_options::host_placement the host buffers are tier_alloc'd (runtime/tier_alloc.h,
//      page aligned, one mapping per buffer) and freed with the engine; without it they are heap
//      vectors. Registered ranges (host_access) are unregistered before they are freed.
//
// Not yet: CUDA streams/events and pinned host memory (the CUDA model path has no backward
// ops, so nothing runs a CUDA step to swap); a row-subset recompute on CUDA (cuBLAS's row
// stability across shapes is unchecked; the recompute runs the cpu kernels). A rounding buffer
// holds a whole layer, dropped rows included, until its device->host copy is done.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <future>
#include <memory>
#include <vector>

#include "parallel/model/decoder_layer.h"
#include "runtime/tier_alloc.h"
#include "runtime/tier_registry.h"

namespace troupe::parallel::memo {

// memcpy of n bytes at most gbps·1e9 bytes/s since t0 counting `done` bytes already copied (0 = unlimited),
// in 1 MiB chunks: the copy threads' bandwidth cap (invariant 6), also used to measure it (alpha.h).
void throttled_copy(void* dst, const void* src, size_t n, double gbps, std::chrono::steady_clock::time_point t0,
                    size_t& done);

struct memo_options {
  double alpha = 1.0;               // fraction of tokens of the other skeletal tensors swapped; the rest recomputed
  int64_t keep_last_layers = 2;     // the last layers are never swapped (paper)
  double copy_bandwidth_gbps = 0;   // 0 = unlimited; > 0 caps each copy thread (1e9 bytes/s)
  bool full_recompute = false;      // keep only x_in, rerun the layer's forward before backward (invariant 8)
  // Where the host buffers live (invariant 10): no nodes = the heap; else tier_alloc with this
  // placement (the activations group of a CXL placement plan, parallel/cxl/placement.h), and each
  // buffer is registered with host_access (tier_registry.h) when host_access.cxl_fraction > 0.
  runtime::placement host_placement = {};
  runtime::tier_access host_access = {};
};

struct memo_swap_stats {
  int64_t swapped_layers = 0;        // layers swapped in the last call
  int64_t swapped_tokens = 0;        // round(alpha * N): rows of the split tensors that went to host
  size_t device_bytes_off = 0;       // sum of layer_activations::bytes() right after each forward (= memo off)
  size_t device_bytes_resident = 0;  // activation bytes on the device at the end of forward (kept layers)
  size_t host_bytes = 0;             // host buffers held (all swapped layers)
  size_t d2h_bytes = 0, h2d_bytes = 0;  // bytes copied in the last call
  int64_t recomputed_rows = 0;       // token rows recomputed in the last call (all tensors, all layers)
  size_t rounding_bytes_peak = 0;    // most bytes the two rounding buffers held at once during forward
};

class memo_swap {
 public:
  explicit memo_swap(memo_options o = {});
  ~memo_swap();
  memo_swap(const memo_swap&) = delete;
  memo_swap& operator=(const memo_swap&) = delete;

  const memo_options& options() const { return opt_; }
  const memo_swap_stats& stats() const { return stats_; }
  bool swapped(int64_t layer) const { return layer < n_layers_ - opt_.keep_last_layers; }

  // The decoder's hooks, in call order (parallel/model/decoder.cpp, forward_backward).
  void begin_forward(const model_config& c, int64_t B, int64_t T);
  void before_forward(int64_t layer, layer_activations& a);  // hands layer-2's staging buffers back
  void after_forward(int64_t layer, layer_activations& a);   // a -> staging, device->host copy starts
  void end_forward(const std::vector<layer_activations>& saved);  // waits for the copies
  void begin_backward();                                     // prefetches the top two swapped layers
  // Waits for the layer's prefetch, restores a and recomputes the dropped rows.
  void before_backward(int64_t layer, layer_activations& a, const layer_params& L, const model_config& c,
                       const attention_geom& g, const float* cos, const float* sin);
  void after_backward(int64_t layer, layer_activations& a);  // a -> staging; prefetch of layer-2 starts
  void end_backward();  // releases the rounding buffers: no activation outlives the step

  struct copy_thread;  // a FIFO of copy jobs on its own thread (swap.cpp)

 private:
  struct host_layer;  // one swapped layer's host buffers and the shapes to restore (swap.cpp)

  void prefetch(int64_t layer);
  void recompute_whole(int64_t layer, layer_activations& a, const layer_params& L, const model_config& c,
                       const attention_geom& g, const float* cos, const float* sin);  // invariant 8

  memo_options opt_;
  memo_swap_stats stats_;
  int64_t n_layers_ = 0, N_ = 0;
  std::unique_ptr<copy_thread> d2h_, h2d_;
  std::vector<std::unique_ptr<host_layer>> host_;
  layer_activations staging_[2];              // the two rounding buffers (even / odd layers)
  std::future<void> staging_done_[2];         // device->host copy out of staging_[i] finished
  std::vector<layer_activations> pending_;    // per layer: prefetched device buffers
  std::vector<std::future<void>> prefetched_; // per layer: host->device copy finished
};

}  // namespace troupe::parallel::memo
