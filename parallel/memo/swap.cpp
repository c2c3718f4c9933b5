// parallel/memo/swap.cpp — see swap.h.
#include "parallel/memo/swap.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>

#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"

namespace troupe::parallel::memo {

namespace kc = troupe::kernels::cpu;
using runtime::errc;
using runtime::tensor;

// A FIFO of copy jobs run in order on one thread (a "stream"); submit() returns the job's fence.
struct memo_swap::copy_thread {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::packaged_task<void()>> q;
  bool stop = false;
  std::thread th;  // last: starts after the rest is constructed

  copy_thread() : th([this] { loop(); }) {}
  ~copy_thread() {
    {
      std::lock_guard<std::mutex> l(m);
      stop = true;
    }
    cv.notify_all();
    th.join();  // runs the queued jobs first
  }
  std::future<void> submit(std::function<void()> f) {
    std::packaged_task<void()> t(std::move(f));
    std::future<void> done = t.get_future();
    {
      std::lock_guard<std::mutex> l(m);
      q.push_back(std::move(t));
    }
    cv.notify_one();
    return done;
  }
  void loop() {
    for (;;) {
      std::packaged_task<void()> t;
      {
        std::unique_lock<std::mutex> l(m);
        cv.wait(l, [&] { return stop || !q.empty(); });
        if (q.empty()) return;
        t = std::move(q.front());
        q.pop_front();
      }
      t();  // an exception lands in the future
    }
  }
};

namespace {

// One saved tensor of a layer: its field and whether only the first n_swap token rows go to host.
struct field {
  tensor* t;
  bool split;
};

// The tensors of `a` in a fixed order. Dense layers: x_in, att, lse whole, the rest token-split.
// MoE layers: everything whole (swap.h invariant 5).
std::vector<field> fields(layer_activations& a, bool moe) {
  std::vector<field> f = {{&a.x_in, false}, {&a.att, false}, {&a.lse, false}};
  const bool s = !moe;
  for (tensor* t : {&a.xn1, &a.rstd1, &a.q, &a.k, &a.v, &a.x_mid, &a.xn2, &a.rstd2}) f.push_back({t, s});
  if (!moe) {
    for (tensor* t : {&a.mlp.h_gate, &a.mlp.h_up, &a.mlp.act}) f.push_back({t, true});
  } else {
    for (tensor* t : {&a.moe.probs, &a.moe.topk_idx, &a.moe.topk_w, &a.moe.xp, &a.moe.h_gate, &a.moe.h_up,
                      &a.moe.yp, &a.moe.shared.h_gate, &a.moe.shared.h_up, &a.moe.shared.act, &a.moe.shared_out,
                      &a.moe.shared_gate})
      f.push_back({t, false});
  }
  return f;
}

// dst's tensors <- src's tensors (src's become undefined). The MoE routing vectors stay where they
// are: they never leave the device (swap.h invariant 5).
void take_tensors(layer_activations& dst, layer_activations& src) {
  moe_activations keep_dst, keep_src;
  for (auto [from, to] : {std::pair{&dst, &keep_dst}, std::pair{&src, &keep_src}}) {
    to->offsets = std::move(from->moe.offsets);
    to->row_slot = std::move(from->moe.row_slot);
    to->slot_row = std::move(from->moe.slot_row);
  }
  dst = std::move(src);
  src = layer_activations{};
  for (auto [from, to] : {std::pair{&keep_dst, &dst}, std::pair{&keep_src, &src}}) {
    to->moe.offsets = std::move(from->offsets);
    to->moe.row_slot = std::move(from->row_slot);
    to->moe.slot_row = std::move(from->slot_row);
  }
}

// memcpy at most `gbps`·1e9 bytes/s (0 = unlimited), in 1 MiB chunks.
void throttled_copy(void* dst, const void* src, size_t n, double gbps, std::chrono::steady_clock::time_point t0,
                    size_t& done) {
  constexpr size_t chunk = size_t{1} << 20;
  for (size_t i = 0; i < n; i += chunk) {
    const size_t m = std::min(chunk, n - i);
    std::memcpy(static_cast<std::byte*>(dst) + i, static_cast<const std::byte*>(src) + i, m);
    done += m;
    if (gbps > 0)
      std::this_thread::sleep_until(t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                             std::chrono::duration<double>(static_cast<double>(done) / (gbps * 1e9))));
  }
}

// rows [n0, N) of full (N, W) -> t (N, W)
void keep_rows(tensor& t, const std::vector<float>& full, int64_t n0, int64_t W) {
  const int64_t N = t.size(0);
  std::memcpy(t.data<float>() + n0 * W, full.data() + n0 * W, static_cast<size_t>((N - n0) * W) * sizeof(float));
}

// Recomputes rows [n0, N) of a dense layer's token-split tensors from x_in and att, with the forward's
// own kernel calls at the forward's shapes (swap.h invariant 2): layer_forward, attention_block_forward
// and mlp_forward, minus the attention core.
int64_t recompute_dense(layer_activations& a, int64_t n0, const layer_params& L, const model_config& c,
                        const attention_geom& g, const float* cos, const float* sin) {
  const int64_t N = g.N(), C = g.C, QD = g.QD(), KVD = g.KVD(), I = a.mlp.h_gate.size(1);
  if (n0 >= N) return 0;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* x_in = a.x_in.data<float>();
  std::vector<float> xn(static_cast<size_t>(N * C)), rstd(static_cast<size_t>(N));
  kc::rmsnorm_forward(xn.data(), rstd.data(), x_in, L.input_norm.data<float>(), N, C, eps);
  keep_rows(a.xn1, xn, n0, C);
  keep_rows(a.rstd1, rstd, n0, 1);
  {
    std::vector<float> q(static_cast<size_t>(N * QD)), k(static_cast<size_t>(N * KVD)), v(k.size());
    kc::matmul_forward(q.data(), xn.data(), L.q_w.data<float>(), fptr(L.q_b), N, C, QD);
    kc::matmul_forward(k.data(), xn.data(), L.k_w.data<float>(), fptr(L.k_b), N, C, KVD);
    kc::matmul_forward(v.data(), xn.data(), L.v_w.data<float>(), fptr(L.v_b), N, C, KVD);
    kc::rope_forward(q.data(), q.data(), cos, sin, g.B, g.T, g.NH, g.HD, g.rotary_dim);
    kc::rope_forward(k.data(), k.data(), cos, sin, g.B, g.T, g.NKV, g.HD, g.rotary_dim);
    keep_rows(a.q, q, n0, QD);
    keep_rows(a.k, k, n0, KVD);
    keep_rows(a.v, v, n0, KVD);
  }
  std::vector<float> xm(static_cast<size_t>(N * C));  // o_proj(att), then x_mid = x_in + it
  kc::matmul_forward(xm.data(), a.att.data<float>(), L.o_w.data<float>(), fptr(L.o_b), N, QD, C);
  for (int64_t i = 0; i < N * C; ++i) xm[static_cast<size_t>(i)] = x_in[i] + xm[static_cast<size_t>(i)];
  keep_rows(a.x_mid, xm, n0, C);
  kc::rmsnorm_forward(xn.data(), rstd.data(), xm.data(), L.post_norm.data<float>(), N, C, eps);
  keep_rows(a.xn2, xn, n0, C);
  keep_rows(a.rstd2, rstd, n0, 1);
  std::vector<float> hg(static_cast<size_t>(N * I)), hu(hg.size()), act(hg.size());
  kc::matmul_forward(hg.data(), xn.data(), L.gate_w.data<float>(), nullptr, N, C, I);
  kc::matmul_forward(hu.data(), xn.data(), L.up_w.data<float>(), nullptr, N, C, I);
  kc::swiglu_forward(act.data(), hg.data(), hu.data(), N, I);
  keep_rows(a.mlp.h_gate, hg, n0, I);
  keep_rows(a.mlp.h_up, hu, n0, I);
  keep_rows(a.mlp.act, act, n0, I);
  return 11 * (N - n0);
}

void wait(std::future<void>& f) {
  if (f.valid()) f.get();
}

}  // namespace

// One swapped layer's host copy: per field its shape/dtype, the bytes that went to host, the buffer.
struct memo_swap::host_layer {
  struct entry {
    runtime::shape_t shape;  // empty: the field was undefined
    runtime::dtype dt = runtime::dtype::f32;
    size_t bytes = 0;  // bytes on host (whole tensor, or its first n_swap rows)
    std::vector<std::byte> buf;
  };
  bool moe = false;
  std::vector<entry> e;
};

memo_swap::memo_swap(memo_options o) : opt_(o) {
  TROUPE_CHECK(std::isfinite(o.alpha) && o.alpha >= 0.0 && o.alpha <= 1.0, errc::invalid_argument,
               "memo_swap: alpha {} must be in [0, 1]", o.alpha);
  TROUPE_CHECK(o.keep_last_layers >= 0, errc::invalid_argument, "memo_swap: keep_last_layers {} must be >= 0",
               o.keep_last_layers);
  TROUPE_CHECK(std::isfinite(o.copy_bandwidth_gbps) && o.copy_bandwidth_gbps >= 0, errc::invalid_argument,
               "memo_swap: copy_bandwidth_gbps {} must be >= 0 (0 = unlimited)", o.copy_bandwidth_gbps);
  d2h_ = std::make_unique<copy_thread>();
  h2d_ = std::make_unique<copy_thread>();
}

memo_swap::~memo_swap() {
  d2h_.reset();  // join the copy threads before the buffers they write go away
  h2d_.reset();
}

void memo_swap::begin_forward(const model_config& c, int64_t B, int64_t T) {
  // Drain whatever an interrupted call left in flight.
  for (auto& f : staging_done_)
    if (f.valid()) f.wait();
  for (auto& f : prefetched_)
    if (f.valid()) f.wait();
  n_layers_ = c.n_layers;
  N_ = B * T;
  host_.resize(static_cast<size_t>(n_layers_));
  pending_.assign(static_cast<size_t>(n_layers_), layer_activations{});
  prefetched_.clear();
  prefetched_.resize(static_cast<size_t>(n_layers_));
  const size_t host = stats_.host_bytes;
  stats_ = memo_swap_stats{};
  stats_.host_bytes = host;
  stats_.swapped_tokens = std::llround(opt_.alpha * static_cast<double>(N_));
  for (int64_t l = 0; l < n_layers_; ++l) {
    if (!host_[static_cast<size_t>(l)]) host_[static_cast<size_t>(l)] = std::make_unique<host_layer>();
    host_[static_cast<size_t>(l)]->moe = c.layer_is_moe(l);
    stats_.swapped_layers += swapped(l) ? 1 : 0;
  }
}

void memo_swap::before_forward(int64_t layer, layer_activations& a) {
  if (!swapped(layer)) return;
  const int s = static_cast<int>(layer % 2);
  wait(staging_done_[s]);  // layer-2's device->host copy is out of this rounding buffer
  if (staging_[s].x_in.defined() && !a.x_in.defined()) take_tensors(a, staging_[s]);
}

void memo_swap::after_forward(int64_t layer, layer_activations& a) {
  stats_.device_bytes_off += a.bytes();
  if (!swapped(layer)) return;
  const int s = static_cast<int>(layer % 2);
  wait(staging_done_[s]);
  host_layer& h = *host_[static_cast<size_t>(layer)];
  const int64_t n_swap = stats_.swapped_tokens;
  std::vector<field> f = fields(a, h.moe);
  h.e.resize(f.size());
  std::vector<tensor> keep;  // the job holds the device tensors until it is done
  std::vector<std::tuple<void*, const void*, size_t>> jobs;
  for (size_t i = 0; i < f.size(); ++i) {
    host_layer::entry& e = h.e[i];
    const tensor& t = *f[i].t;
    if (!t.defined()) {
      e.shape.clear();
      e.bytes = 0;
      continue;
    }
    TROUPE_CHECK(t.is_contiguous(), errc::internal, "memo_swap: layer {} field {} is not contiguous", layer, i);
    TROUPE_CHECK(!f[i].split || t.size(0) == N_, errc::internal, "memo_swap: layer {} field {} has {} rows, not {}",
                 layer, i, t.size(0), N_);
    e.shape = t.shape();
    e.dt = t.dtype();
    e.bytes = f[i].split ? t.nbytes() / static_cast<size_t>(N_) * static_cast<size_t>(n_swap) : t.nbytes();
    if (e.buf.size() != e.bytes) e.buf.assign(e.bytes, std::byte{0});  // once per run for a fixed shape
    keep.push_back(t);
    if (e.bytes > 0) jobs.emplace_back(e.buf.data(), t.data_ptr(), e.bytes);
    stats_.d2h_bytes += e.bytes;
  }
  take_tensors(staging_[s], a);
  stats_.rounding_bytes_peak = std::max(stats_.rounding_bytes_peak, staging_[0].bytes() + staging_[1].bytes());
  const double bw = opt_.copy_bandwidth_gbps;
  staging_done_[s] = d2h_->submit([keep = std::move(keep), jobs = std::move(jobs), bw] {
    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
    for (auto& [dst, src, n] : jobs) throttled_copy(dst, src, n, bw, t0, done);
  });
}

void memo_swap::end_forward(const std::vector<layer_activations>& saved) {
  for (int s = 0; s < 2; ++s) {
    wait(staging_done_[s]);
    staging_[s] = layer_activations{};  // the rounding buffers are free until backward
  }
  stats_.device_bytes_resident = 0;
  for (const layer_activations& a : saved) stats_.device_bytes_resident += a.bytes();
  stats_.host_bytes = 0;
  for (const auto& h : host_)
    if (h)
      for (const auto& e : h->e) stats_.host_bytes += e.buf.size();
}

void memo_swap::prefetch(int64_t layer) {
  const auto ul = static_cast<size_t>(layer);
  if (prefetched_[ul].valid()) return;
  layer_activations& p = pending_[ul];
  take_tensors(p, staging_[layer % 2]);  // this parity's rounding buffer, when one is free
  host_layer& h = *host_[ul];
  std::vector<field> f = fields(p, h.moe);
  TROUPE_CHECK(f.size() == h.e.size(), errc::internal, "memo_swap: layer {} was not swapped out", layer);
  std::vector<tensor> keep;
  std::vector<std::tuple<void*, const void*, size_t>> jobs;
  for (size_t i = 0; i < f.size(); ++i) {
    const host_layer::entry& e = h.e[i];
    tensor& t = *f[i].t;
    if (e.shape.empty()) {
      t = tensor{};
      continue;
    }
    if (!t.defined() || t.shape() != e.shape || t.dtype() != e.dt) t = tensor::empty(e.shape, e.dt);
    keep.push_back(t);
    if (e.bytes > 0) jobs.emplace_back(t.data_ptr(), e.buf.data(), e.bytes);
    stats_.h2d_bytes += e.bytes;
  }
  const double bw = opt_.copy_bandwidth_gbps;
  prefetched_[ul] = h2d_->submit([keep = std::move(keep), jobs = std::move(jobs), bw] {
    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
    for (auto& [dst, src, n] : jobs) throttled_copy(dst, src, n, bw, t0, done);
  });
}

void memo_swap::begin_backward() {
  // Prefetch for layer i starts after layer i+2's backward; the top two have no such layer.
  for (int64_t l = n_layers_ - 1; l >= std::max<int64_t>(0, n_layers_ - 2); --l)
    if (swapped(l)) prefetch(l);
}

void memo_swap::before_backward(int64_t layer, layer_activations& a, const layer_params& L, const model_config& c,
                                const attention_geom& g, const float* cos, const float* sin) {
  if (!swapped(layer)) return;
  const auto ul = static_cast<size_t>(layer);
  prefetch(layer);  // no-op when already started
  prefetched_[ul].get();
  take_tensors(a, pending_[ul]);
  if (!host_[ul]->moe) stats_.recomputed_rows += recompute_dense(a, stats_.swapped_tokens, L, c, g, cos, sin);
}

void memo_swap::after_backward(int64_t layer, layer_activations& a) {
  if (swapped(layer)) take_tensors(staging_[layer % 2], a);  // becomes layer-2's prefetch target
  if (layer >= 2 && swapped(layer - 2)) prefetch(layer - 2);
}

}  // namespace troupe::parallel::memo
