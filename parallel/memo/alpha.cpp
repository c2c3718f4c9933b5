// parallel/memo/alpha.cpp — see alpha.h.
#include "parallel/memo/alpha.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "parallel/memo/swap.h"
#include "parallel/model/decoder.h"
#include "parallel/model/decoder_layer.h"
#include "runtime/error.h"

namespace troupe::parallel::memo {

using runtime::errc;

namespace {

constexpr int64_t f32 = 4;  // fp32 and i32 elements alike

void check_shape(const model_config& c, int64_t B, int64_t T, const char* where) {
  TROUPE_CHECK(B > 0 && T > 0, errc::invalid_argument, "{}: batch {} and tokens {} must be > 0", where, B, T);
  TROUPE_CHECK(c.hidden > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0, errc::invalid_argument,
               "{}: model config has hidden {}, heads {}, kv heads {}, head_dim {} (all must be > 0)", where,
               c.hidden, c.n_heads, c.n_kv_heads, c.head_dim);
}

// The attention part every layer saves: x_in, xn1, rstd1, q, k, v, att, lse, x_mid, xn2, rstd2.
struct attn_part {
  int64_t x_in, att_lse, per_token;  // per_token: bytes of one row of xn1, rstd1, q, k, v, x_mid, xn2, rstd2
};

attn_part attention_bytes(const model_config& c, int64_t B, int64_t T) {
  const int64_t N = B * T, C = c.hidden, QD = c.n_heads * c.head_dim, KVD = c.n_kv_heads * c.head_dim;
  return {f32 * N * C, f32 * (N * QD + B * c.n_heads * T), f32 * (3 * C + 2 + QD + 2 * KVD)};
}

// Seconds to copy `bytes` at `gbps` (1e9 bytes/s); +inf bandwidth is free.
double copy_seconds(int64_t bytes, double gbps) {
  return std::isinf(gbps) ? 0.0 : static_cast<double>(bytes) / (gbps * 1e9);
}

// The largest k in [0, N] with fits(k), for fits monotone (true then false); -1 if !fits(0).
template <class Fits>
int64_t largest_fitting(int64_t N, Fits fits) {
  if (!fits(0)) return -1;
  int64_t lo = 0, hi = N;  // fits(lo)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

layer_swap_bytes dense_swap_bytes(const model_config& c, int64_t B, int64_t T) {
  check_shape(c, B, T, "memo dense_swap_bytes");
  const attn_part a = attention_bytes(c, B, T);
  const int64_t N = B * T;
  return {a.x_in, a.att_lse, N * (a.per_token + f32 * 3 * c.intermediate)};  // + mlp h_gate, h_up, act
}

layer_swap_bytes swap_bytes(const model_config& c, int64_t B, int64_t T, int64_t layer) {
  check_shape(c, B, T, "memo swap_bytes");
  TROUPE_CHECK(layer >= 0, errc::invalid_argument, "memo swap_bytes: layer {} must be >= 0", layer);
  if (!c.layer_is_moe(layer)) return dense_swap_bytes(c, B, T);
  // moe_block.cpp's allocations; the routing vectors (offsets, row_slot, slot_row) stay on the device.
  const attn_part a = attention_bytes(c, B, T);
  const int64_t N = B * T, C = c.hidden, E = c.n_experts, K = c.top_k, Im = c.moe_intermediate, R = N * K;
  int64_t moe = f32 * (N * E + 2 * N * K + 2 * R * C + 2 * R * Im);  // probs, topk_idx/w, xp/yp, h_gate/h_up
  const int64_t Is = c.shared_expert_intermediate;
  if (Is > 0) moe += f32 * (3 * N * Is + N * C + N);  // shared h_gate/h_up/act, shared_out, shared_gate
  return {a.x_in + a.att_lse + N * a.per_token + moe, 0, 0};
}

int64_t host_bytes(const model_config& c, int64_t B, int64_t T, double alpha, int64_t keep) {
  TROUPE_CHECK(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0, errc::invalid_argument,
               "memo host_bytes: alpha {} must be in [0, 1]", alpha);
  TROUPE_CHECK(keep >= 0, errc::invalid_argument, "memo host_bytes: keep {} must be >= 0", keep);
  const int64_t N = B * T, n_swap = std::llround(alpha * static_cast<double>(N));
  int64_t sum = 0;
  for (int64_t l = 0; l < c.n_layers - keep; ++l) {
    const layer_swap_bytes s = swap_bytes(c, B, T, l);
    sum += s.input + s.attn + s.others / N * n_swap;
  }
  return sum;
}

alpha_result choose_alpha(const model_config& c, int64_t B, int64_t T, const alpha_inputs& in) {
  check_shape(c, B, T, "memo choose_alpha");
  TROUPE_CHECK(in.layer_forward_s >= 0, errc::invalid_argument,
               "memo choose_alpha: layer_forward_s {} must be >= 0 (measure_layer_forward_s)", in.layer_forward_s);
  TROUPE_CHECK(in.host_gbps > 0, errc::invalid_argument,
               "memo choose_alpha: host_gbps {} must be > 0 (measure_copy_gbps; +inf = no bandwidth bound)",
               in.host_gbps);
  TROUPE_CHECK(in.host_limit_bytes >= 0, errc::invalid_argument,
               "memo choose_alpha: host_limit_bytes {} must be >= 0 (0 = unlimited)", in.host_limit_bytes);
  TROUPE_CHECK(in.n_layers >= 0 && in.keep_last_layers >= 0, errc::invalid_argument,
               "memo choose_alpha: n_layers {} and keep_last_layers {} must be >= 0", in.n_layers,
               in.keep_last_layers);
  const int64_t N = B * T, L = in.n_layers > 0 ? in.n_layers : c.n_layers;
  const int64_t swapped = std::max<int64_t>(0, L - in.keep_last_layers);
  std::vector<int64_t> fixed, row;  // per swapped layer: whole bytes, bytes per split token row
  for (int64_t l = 0; l < swapped; ++l) {
    const layer_swap_bytes s = swap_bytes(c, B, T, l);
    fixed.push_back(s.input + s.attn);
    row.push_back(s.others / N);
  }
  auto worst_copy_s = [&](int64_t k) {
    double w = 0;
    for (size_t i = 0; i < fixed.size(); ++i) w = std::max(w, copy_seconds(fixed[i] + row[i] * k, in.host_gbps));
    return w;
  };
  auto total = [&](int64_t k) {
    int64_t s = 0;
    for (size_t i = 0; i < fixed.size(); ++i) s += fixed[i] + row[i] * k;
    return s;
  };
  const int64_t k_bw = largest_fitting(N, [&](int64_t k) { return worst_copy_s(k) <= in.layer_forward_s; });
  const int64_t k_host =
      largest_fitting(N, [&](int64_t k) { return in.host_limit_bytes == 0 || total(k) <= in.host_limit_bytes; });

  alpha_result r;
  r.bandwidth_bound = k_bw < N;
  r.host_bound = k_host < N;
  r.feasible = k_bw >= 0 && k_host >= 0;
  const int64_t k = r.feasible ? std::min(k_bw, k_host) : 0;
  r.alpha = static_cast<double>(k) / static_cast<double>(N);
  r.copy_s_at_alpha = worst_copy_s(k);
  r.host_bytes_at_alpha = total(k);
  if (swapped == 0) {
    r.reason = fmt::format("alpha = 1: no layer is swapped (keep_last_layers {} >= {} layers)", in.keep_last_layers, L);
  } else if (!r.feasible) {
    std::string broken;
    if (k_bw < 0)
      broken = fmt::format("bandwidth: a layer's whole tensors take {:.3g} s to copy at {:.3g} GB/s > layer forward "
                           "{:.3g} s",
                           worst_copy_s(0), in.host_gbps, in.layer_forward_s);
    if (k_host < 0)
      broken += fmt::format("{}host memory: {} swapped layers hold {} bytes at alpha = 0 > host limit {}",
                            broken.empty() ? "" : "; ", swapped, total(0), in.host_limit_bytes);
    r.reason = "alpha = 0 and still over a bound: " + broken;
  } else {
    const std::string limit =
        in.host_limit_bytes == 0 ? std::string("unlimited") : fmt::format("limit {}", in.host_limit_bytes);
    const std::string head =
        k == N ? std::string("alpha = 1")
               : fmt::format("alpha = {}/{} tokens, limited by {}", k, N, k_bw <= k_host ? "bandwidth" : "host memory");
    r.reason = fmt::format("{}: copy {:.3g} s vs layer forward {:.3g} s, host {} bytes ({})", head, r.copy_s_at_alpha,
                           in.layer_forward_s, r.host_bytes_at_alpha, limit);
  }
  return r;
}

double measure_layer_forward_s(const model_weights& w, int64_t B, int64_t T, int repeats) {
  const model_config& c = w.config();
  check_shape(c, B, T, "memo measure_layer_forward_s");
  TROUPE_CHECK(repeats >= 1, errc::invalid_argument, "memo measure_layer_forward_s: repeats {} must be >= 1",
               repeats);
  TROUPE_CHECK(!w.layers.empty(), errc::invalid_argument, "memo measure_layer_forward_s: the model has no layers");
  std::vector<float> cos, sin;
  const attention_geom g = attention_geom::of(c, B, T, rope_tables(c, 0, T, T, &cos, &sin));

  const size_t n = static_cast<size_t>(B * T * c.hidden);
  std::vector<float> x0(n), x(n);
  std::mt19937 rng(1234);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& v : x0) v = d(rng);
  layer_activations a;
  std::vector<double> s;
  for (int i = 0; i <= repeats; ++i) {  // i = 0: warm-up (allocations, caches)
    x = x0;
    const auto t0 = std::chrono::steady_clock::now();
    layer_forward(x.data(), a, w.layers[0], c, g, cos.data(), sin.data(), nullptr, 0);
    const auto t1 = std::chrono::steady_clock::now();
    if (i > 0) s.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  return median(std::move(s));
}

double measure_copy_gbps(size_t bytes, double cap_gbps, int repeats) {
  TROUPE_CHECK(bytes > 0, errc::invalid_argument, "memo measure_copy_gbps: bytes must be > 0");
  TROUPE_CHECK(std::isfinite(cap_gbps) && cap_gbps >= 0, errc::invalid_argument,
               "memo measure_copy_gbps: cap_gbps {} must be >= 0 (0 = no cap)", cap_gbps);
  TROUPE_CHECK(repeats >= 1, errc::invalid_argument, "memo measure_copy_gbps: repeats {} must be >= 1", repeats);
  std::vector<std::byte> src(bytes, std::byte{1}), dst(bytes, std::byte{0});  // both touched: no page faults timed
  std::vector<double> s;
  for (int i = 0; i <= repeats; ++i) {  // i = 0: warm-up
    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
    throttled_copy(dst.data(), src.data(), bytes, cap_gbps, t0, done);  // swap.h: as the copy threads do
    const auto t1 = std::chrono::steady_clock::now();
    if (i > 0) s.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  const double sec = std::max(median(std::move(s)), 1e-9);  // a timer tick below the copy is not infinite
  const double gbps = static_cast<double>(bytes) / sec / 1e9;
  return cap_gbps > 0 ? std::min(gbps, cap_gbps) : gbps;
}

}  // namespace troupe::parallel::memo
