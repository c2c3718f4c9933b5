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
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/tier_registry.h"

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

// (dst, src, bytes) of one copy stream's job.
using copy_jobs = std::vector<std::tuple<void*, const void*, size_t>>;

// Runs `jobs` on the copy thread `th` under the bandwidth cap; host buffers on an emulated CXL
// tier cost what the tier says (tier_registry.h). `keep` holds the device tensors until the copies
// are done and is cleared before the fence, so a last reference never drops on the copy thread.
std::future<void> submit_copies(memo_swap::copy_thread& th, std::vector<tensor> keep, copy_jobs jobs, double bw) {
  return th.submit([keep = std::move(keep), jobs = std::move(jobs), bw]() mutable {
    const auto t0 = std::chrono::steady_clock::now();
    size_t done = 0;
    double owed = 0;
    for (auto& [dst, src, n] : jobs) {
      throttled_copy(dst, src, n, bw, t0, done);
      owed += runtime::emulated_seconds(dst, n) + runtime::emulated_seconds(src, n);
      runtime::emulate_access(t0, owed);
    }
    keep.clear();
  });
}

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


// rope_forward, in place, on rows [r0, N) of t: (B, T, NH, HD). Per sequence b, its rows from
// max(r0, b*T) on, as one sequence of the remaining length with the tables from that position on:
// rope is element-wise per row, so each row gets the forward's bits.
void rope_rows(float* t, int64_t r0, const attention_geom& g, int64_t NH, const float* cos, const float* sin) {
  const int64_t W = NH * g.HD, half = g.rotary_dim / 2;
  for (int64_t b = r0 / g.T; b < g.B; ++b) {
    const int64_t p = std::max(r0, b * g.T) - b * g.T;  // first position recomputed in sequence b
    float* x = t + (b * g.T + p) * W;
    kc::rope_forward(x, x, cos + p * half, sin + p * half, 1, g.T - p, NH, g.HD, g.rotary_dim);
  }
}

// Recomputes rows [n0, N) of a dense layer's token-split tensors in place, from x_in, att and the
// rows [0, n0) restored from host (swap.h invariant 2): the forward's kernels of layer_forward,
// attention_block_forward and mlp_forward (minus the attention core and down_proj) on those rows only.
// Row-wise ops (rmsnorm, swiglu, the residual add) run on rows [n0, N). A matmul runs the forward's
// own sgemm blocks from the one holding row n0 (kernels/matmul.h, invariant 3), so it also rewrites
// the restored rows [r, n0) of its block, with the same bits; rope re-rotates exactly the rows its
// matmul wrote. Returns the rows written, summed over the 11 tensors.
int64_t recompute_dense(layer_activations& a, int64_t n0, const layer_params& L, const model_config& c,
                        const attention_geom& g, const float* cos, const float* sin) {
  const int64_t N = g.N(), C = g.C, QD = g.QD(), KVD = g.KVD(), I = a.mlp.h_gate.size(1);
  if (n0 >= N) return 0;
  const int64_t n = N - n0;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float* x_in = a.x_in.data<float>();
  float *xn1 = a.xn1.data<float>(), *q = a.q.data<float>(), *k = a.k.data<float>(), *v = a.v.data<float>();
  float *xm = a.x_mid.data<float>(), *xn2 = a.xn2.data<float>();
  float *hg = a.mlp.h_gate.data<float>(), *hu = a.mlp.h_up.data<float>(), *act = a.mlp.act.data<float>();
  kc::rmsnorm_forward(xn1 + n0 * C, a.rstd1.data<float>() + n0, x_in + n0 * C, L.input_norm.data<float>(), n, C,
                      eps);
  const int64_t rq = kc::matmul_forward_rows(q, xn1, L.q_w.data<float>(), fptr(L.q_b), N, C, QD, n0);
  const int64_t rk = kc::matmul_forward_rows(k, xn1, L.k_w.data<float>(), fptr(L.k_b), N, C, KVD, n0);
  const int64_t rv = kc::matmul_forward_rows(v, xn1, L.v_w.data<float>(), fptr(L.v_b), N, C, KVD, n0);
  rope_rows(q, rq, g, g.NH, cos, sin);
  rope_rows(k, rk, g, g.NKV, cos, sin);
  // x_mid = x_in + o_proj(att): the projection lands in x_mid's rows [ro, N), then the forward's sum.
  const int64_t ro = kc::matmul_forward_rows(xm, a.att.data<float>(), L.o_w.data<float>(), fptr(L.o_b), N, QD, C, n0);
  for (int64_t i = ro * C; i < N * C; ++i) xm[i] = x_in[i] + xm[i];
  kc::rmsnorm_forward(xn2 + n0 * C, a.rstd2.data<float>() + n0, xm + n0 * C, L.post_norm.data<float>(), n, C, eps);
  const int64_t rg = kc::matmul_forward_rows(hg, xn2, L.gate_w.data<float>(), nullptr, N, C, I, n0);
  const int64_t ru = kc::matmul_forward_rows(hu, xn2, L.up_w.data<float>(), nullptr, N, C, I, n0);
  kc::swiglu_forward(act + n0 * I, hg + n0 * I, hu + n0 * I, n, I);
  return 5 * n + (N - rq) + (N - rk) + (N - rv) + (N - ro) + (N - rg) + (N - ru);
}

void wait(std::future<void>& f) {
  if (f.valid()) f.get();
}

}  // namespace

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

// A host buffer: a heap vector, or tier memory when memo_options::host_placement names nodes (invariant 10).
struct host_buffer {
  struct tier_free_fn {
    void operator()(runtime::tier_allocation* a) const {
      runtime::unregister_tier_range(a->ptr);  // no-op when it was not registered
      runtime::tier_free(*a);
      delete a;
    }
  };
  std::vector<std::byte> heap;
  std::unique_ptr<runtime::tier_allocation, tier_free_fn> tier;
  size_t n = 0;

  std::byte* data() { return tier ? static_cast<std::byte*>(tier->ptr) : heap.data(); }
  const std::byte* data() const { return tier ? static_cast<const std::byte*>(tier->ptr) : heap.data(); }
  size_t size() const { return n; }
  void reset(size_t bytes, const memo_options& o) {
    tier.reset();
    heap.clear();
    heap.shrink_to_fit();
    n = bytes;
    if (bytes == 0) return;
    if (o.host_placement.nodes.empty()) {
      heap.assign(bytes, std::byte{0});
      return;
    }
    tier.reset(new runtime::tier_allocation(runtime::tier_alloc(bytes, o.host_placement)));  // zero filled
    if (o.host_access.cxl_fraction > 0) runtime::register_tier_range(tier->ptr, tier->bytes, o.host_access);
  }
};

// One swapped layer's host copy: per field its shape/dtype, the bytes that went to host, the buffer.
struct memo_swap::host_layer {
  struct entry {
    runtime::shape_t shape;  // empty: the field was undefined
    runtime::dtype dt = runtime::dtype::f32;
    size_t bytes = 0;  // bytes on host (whole tensor, or its first n_swap rows)
    host_buffer buf;
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
  if (o.full_recompute) return;  // no host copies (invariant 8)
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
  stats_.swapped_tokens = opt_.full_recompute ? 0 : std::llround(opt_.alpha * static_cast<double>(N_));
  for (int64_t l = 0; l < n_layers_; ++l) {
    if (!host_[static_cast<size_t>(l)]) host_[static_cast<size_t>(l)] = std::make_unique<host_layer>();
    host_[static_cast<size_t>(l)]->moe = c.layer_is_moe(l);
    stats_.swapped_layers += swapped(l) ? 1 : 0;
  }
}

void memo_swap::before_forward(int64_t layer, layer_activations& a) {
  if (!swapped(layer) || opt_.full_recompute) return;
  const int s = static_cast<int>(layer % 2);
  wait(staging_done_[s]);  // layer-2's device->host copy is out of this rounding buffer
  if (staging_[s].x_in.defined() && !a.x_in.defined()) take_tensors(a, staging_[s]);
}

void memo_swap::after_forward(int64_t layer, layer_activations& a) {
  stats_.device_bytes_off += a.bytes();
  if (!swapped(layer)) return;
  if (opt_.full_recompute) {  // only x_in stays, on the device (invariant 8)
    tensor x_in = std::move(a.x_in);
    a = layer_activations{};
    a.x_in = std::move(x_in);
    return;
  }
  const int s = static_cast<int>(layer % 2);
  wait(staging_done_[s]);
  host_layer& h = *host_[static_cast<size_t>(layer)];
  const int64_t n_swap = stats_.swapped_tokens;
  std::vector<field> f = fields(a, h.moe);
  h.e.resize(f.size());
  std::vector<tensor> keep;  // the job holds the device tensors until it is done
  copy_jobs jobs;
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
    if (e.buf.size() != e.bytes) e.buf.reset(e.bytes, opt_);  // once per run for a fixed shape
    keep.push_back(t);
    if (e.bytes > 0) jobs.emplace_back(e.buf.data(), t.data_ptr(), e.bytes);
    stats_.d2h_bytes += e.bytes;
  }
  take_tensors(staging_[s], a);
  stats_.rounding_bytes_peak = std::max(stats_.rounding_bytes_peak, staging_[0].bytes() + staging_[1].bytes());
  const double bw = opt_.copy_bandwidth_gbps;
  staging_done_[s] = submit_copies(*d2h_, std::move(keep), std::move(jobs), bw);
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
  copy_jobs jobs;
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
  prefetched_[ul] = submit_copies(*h2d_, std::move(keep), std::move(jobs), bw);
}

void memo_swap::begin_backward() {
  if (opt_.full_recompute) return;
  // Prefetch for layer i starts after layer i+2's backward; the top two have no such layer.
  for (int64_t l = n_layers_ - 1; l >= std::max<int64_t>(0, n_layers_ - 2); --l)
    if (swapped(l)) prefetch(l);
}

void memo_swap::before_backward(int64_t layer, layer_activations& a, const layer_params& L, const model_config& c,
                                const attention_geom& g, const float* cos, const float* sin) {
  if (!swapped(layer)) return;
  if (opt_.full_recompute) return recompute_whole(layer, a, L, c, g, cos, sin);
  const auto ul = static_cast<size_t>(layer);
  prefetch(layer);  // no-op when already started
  prefetched_[ul].get();
  take_tensors(a, pending_[ul]);
  if (!host_[ul]->moe) stats_.recomputed_rows += recompute_dense(a, stats_.swapped_tokens, L, c, g, cos, sin);
}

void memo_swap::after_backward(int64_t layer, layer_activations& a) {
  if (opt_.full_recompute) {
    if (swapped(layer)) a = layer_activations{};  // its backward is done
    return;
  }
  if (swapped(layer)) take_tensors(staging_[layer % 2], a);  // becomes layer-2's prefetch target
  if (layer >= 2 && swapped(layer - 2)) prefetch(layer - 2);
}

// The layer's whole forward again, from a copy of x_in (layer_forward overwrites its input with
// its output), into a: the forward's kernels on the forward's shapes, so the same bits.
void memo_swap::recompute_whole(int64_t layer, layer_activations& a, const layer_params& L, const model_config& c,
                                const attention_geom& g, const float* cos, const float* sin) {
  const int64_t N = g.N();
  TROUPE_CHECK(a.x_in.defined() && a.x_in.ndim() == 2 && a.x_in.size(0) == N && a.x_in.size(1) == g.C,
               errc::internal, "memo_swap: full recompute of layer {}: x_in {} is not the forward's ({}, {})", layer,
               a.x_in.defined() ? a.x_in.describe() : std::string("undefined"), N, g.C);
  tensor x = a.x_in.clone();
  layer_forward(x.data<float>(), a, L, c, g, cos, sin, /*cache=*/nullptr, layer);
  stats_.recomputed_rows += N;
}

void memo_swap::end_backward() {
  for (auto& f : prefetched_)
    if (f.valid()) f.wait();
  for (layer_activations& s : staging_) s = layer_activations{};
  for (layer_activations& p : pending_) p = layer_activations{};
}

}  // namespace troupe::parallel::memo
