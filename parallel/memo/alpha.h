// parallel/memo/alpha.h — MEMO's swap fraction α from measurements (SIGMOD 2025, arXiv 2407.12117;
// ../shared/ALGORITHMS.md): the largest α in [0, 1] whose per-layer device->host copy hides under one
// layer's forward and whose swapped layers fit in host memory,
//   (S_input + S_attn + α·S_others) / B_host <= T_layer_forward   (every swapped layer)
//   Σ_swapped (S_input + S_attn + α·S_others) <= M_host           (= (L−keep)·(...) for identical layers)
//
//   alpha_inputs in{.layer_forward_s = memo::measure_layer_forward_s(w, B, T),
//                   .host_gbps = memo::measure_copy_gbps(size_t{64} << 20, /*cap_gbps=*/12),
//                   .host_limit_bytes = int64_t{64} << 30};
//   alpha_result r = memo::choose_alpha(w.config(), B, T, in);
//   if (!r.feasible) log(r.reason);                     // α = 0 and still over a bound: caller decides
//   memo::memo_swap swap({.alpha = r.alpha, .keep_last_layers = in.keep_last_layers});
//   memo::host_bytes(w.config(), B, T, r.alpha, 2);     // == swap.stats().host_bytes after a forward
//
// Invariants:
//   1. swap_bytes counts exactly what parallel/memo/swap.cpp copies for one layer at (B, T), all fp32/i32
//      (4 bytes): dense layers input = x_in, attn = att + lse (whole), others = the token-split tensors
//      xn1, rstd1, q, k, v, x_mid, xn2, rstd2, mlp.{h_gate, h_up, act} at all N = B·T rows (others is a
//      multiple of N); MoE layers are swapped whole, so everything is in input and others = 0 (the
//      routing index vectors, which stay on the device, are not counted).
//   2. host_bytes(c, B, T, α, keep) == memo_swap::stats().host_bytes after a forward with that α and
//      keep: per swapped layer input + attn + others/N · llround(α·N) (the engine's row count).
//   3. choose_alpha returns α = k/N for a whole token count k, the largest with both bounds met at
//      exactly k swapped rows, so the engine's llround(α·N) = k keeps them met. Layers are those
//      0 .. n_layers − keep − 1; the bandwidth bound is checked on the worst swapped layer. GB/s is
//      1e9 bytes/s, as memo_options::copy_bandwidth_gbps.
//   4. bandwidth_bound / host_bound: that bound alone keeps α below 1. If even α = 0 breaks a bound,
//      α = 0, feasible = false and reason names the broken bound(s); nothing throws for that.
//   5. The measurements time real work (layer_forward of layer 0; chunked memcpy) as the median of
//      `repeats` runs after one warm-up; measure_copy_gbps returns min(measured, cap) when cap > 0 and
//      throttles its copy as swap.cpp's copy threads do.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "parallel/model/model_weights.h"

namespace troupe::parallel::memo {

// One layer's bytes that go to host (invariant 1). At α: input + attn + others / N · llround(α·N).
struct layer_swap_bytes {
  int64_t input = 0;   // swapped whole (MoE layers: everything)
  int64_t attn = 0;    // swapped whole (dense layers: att + lse)
  int64_t others = 0;  // token-split tensors at all N rows; α·N rows of them go to host
};

// Dense-layer byte counts at (B, T) (whatever c.layer_is_moe says).
layer_swap_bytes dense_swap_bytes(const model_config& c, int64_t B, int64_t T);
// Layer `layer` of c at (B, T): dense_swap_bytes, or for an MoE layer everything in input.
layer_swap_bytes swap_bytes(const model_config& c, int64_t B, int64_t T, int64_t layer);
// Host bytes memo_swap holds after a forward with this α and keep_last_layers (invariant 2).
int64_t host_bytes(const model_config& c, int64_t B, int64_t T, double alpha, int64_t keep);

struct alpha_inputs {
  double layer_forward_s = 0;    // T_layer_forward: one layer's forward time (measure_layer_forward_s)
  double host_gbps = 0;          // B_host in 1e9 bytes/s (measure_copy_gbps); +inf = no bandwidth bound
  int64_t host_limit_bytes = 0;  // M_host; 0 = unlimited
  int64_t n_layers = 0;          // layers the engine sees; 0 = c.n_layers
  int64_t keep_last_layers = 2;  // never swapped (paper: the last two)
};

struct alpha_result {
  double alpha = 0;               // k / N, k whole tokens (invariant 3)
  bool bandwidth_bound = false;   // the copy-time bound alone keeps α < 1 (or is broken at α = 0)
  bool host_bound = false;        // the host-memory bound alone keeps α < 1 (or is broken at α = 0)
  bool feasible = true;           // false: α = 0 still breaks a bound (named in reason)
  double copy_s_at_alpha = 0;     // worst swapped layer's copy time at alpha
  int64_t host_bytes_at_alpha = 0;  // host_bytes at alpha (all swapped layers)
  std::string reason;             // one line: what decided α
};

alpha_result choose_alpha(const model_config& c, int64_t B, int64_t T, const alpha_inputs& in);

// Median seconds of layer_forward of layer 0 at (B, T), random input, after one warm-up run.
double measure_layer_forward_s(const model_weights& w, int64_t B, int64_t T, int repeats = 3);
// Host memcpy bandwidth in 1e9 bytes/s over `bytes`, in 1 MiB chunks throttled to cap_gbps as
// swap.cpp's copy threads are; returns min(measured, cap_gbps) when cap_gbps > 0 (0 = no cap).
double measure_copy_gbps(size_t bytes, double cap_gbps = 0, int repeats = 3);

}  // namespace troupe::parallel::memo
