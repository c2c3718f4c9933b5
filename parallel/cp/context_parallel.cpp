// parallel/cp/context_parallel.cpp — Ulysses (all_to_all head sharding) and ring attention
// (k/v passed around the ring, log-sum-exp merge) over a CP group, from the cpu kernels.
#include "parallel/cp/context_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "runtime/error.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;
using kernels::attention_dims;
using runtime::errc;
using runtime::tensor;

int context_parallel::rank() const { return comm != nullptr ? comm->rank() : 0; }
int context_parallel::size() const { return comm != nullptr ? comm->size() : 1; }

const char* cp_mode_name(cp_mode m) { return m == cp_mode::ring ? "ring" : "ulysses"; }

void cp_check(const context_parallel& cp, int64_t NH, int64_t NKV, const char* where) {
  TROUPE_CHECK(cp.comm != nullptr, errc::invalid_argument,
               "{}: context_parallel has no communicator (set .comm to the CP group)", where);
  const int64_t P = cp.size();
  if (cp.mode == cp_mode::ulysses)
    TROUPE_CHECK(NH % P == 0 && NKV % P == 0, errc::invalid_argument,
                 "{}: ulysses context parallelism over {} ranks needs num heads {} and num kv heads {} to be "
                 "multiples of {}; use cp_mode::ring or a CP size dividing both",
                 where, P, NH, NKV, P);
}

namespace {

constexpr int kTagRingFwd = 0x4350;       // k, v chunks in forward
constexpr int kTagRingBwd = 0x4351;       // k, v, dk, dv chunks in backward
constexpr int kTagRingBwdHome = 0x4352;   // the final hop of dk, dv to their owner

// Token-major (B, T, NH, HD) block copy: T tokens x nh heads of every sequence,
// dst[b, dt0 + t, dh0 + i] = src[b, st0 + t, sh0 + i].
struct tok_layout {
  float* p;
  int64_t T, NH, t0, h0;
};
struct tok_clayout {
  const float* p;
  int64_t T, NH, t0, h0;
};
void copy_tokens(tok_layout dst, tok_clayout src, int64_t B, int64_t T, int64_t nh, int64_t HD) {
  const size_t bytes = static_cast<size_t>(nh * HD) * sizeof(float);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(dst.p + ((b * dst.T + dst.t0 + t) * dst.NH + dst.h0) * HD,
                  src.p + ((b * src.T + src.t0 + t) * src.NH + src.h0) * HD, bytes);
}
// Head-major (B, NH, T) lse block copy, same indexing.
void copy_lse(tok_layout dst, tok_clayout src, int64_t B, int64_t T, int64_t nh) {
  const size_t bytes = static_cast<size_t>(T) * sizeof(float);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      std::memcpy(dst.p + (b * dst.NH + dst.h0 + h) * dst.T + dst.t0,
                  src.p + (b * src.NH + src.h0 + h) * src.T + src.t0, bytes);
}

void all_to_all_equal(const context_parallel& cp, tensor& recv, const tensor& send, int64_t per_rank) {
  const std::vector<int64_t> counts(static_cast<size_t>(cp.size()), per_rank);
  cp.comm->all_to_all_v(recv, counts, send, counts);
}

// send `out` to rank + 1 and receive `in` from rank - 1. Even ranks send first, odd ranks
// receive first, so that a backend whose send blocks until matched cannot deadlock.
void ring_shift(const context_parallel& cp, const tensor& out, tensor& in, int tag) {
  const int r = cp.rank(), P = cp.size();
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  if (r % 2 == 0) {
    cp.comm->send(out, next, tag);
    cp.comm->recv(in, prev, tag);
  } else {
    cp.comm->recv(in, prev, tag);
    cp.comm->send(out, next, tag);
  }
}

// Chunk j's keys are visible to some query of chunk r (chunks of T tokens, causal, window).
bool ring_visible(int64_t j, int64_t r, int64_t T, int64_t window) {
  if (j > r) return false;
  return window <= 0 || (r - j) * T - (T - 1) < window;  // closest pair: query r*T, key j*T + T-1
}

// ---- Ulysses --------------------------------------------------------------------------------

void ulysses_forward(float* out, float* lse, const float* q, const float* k, const float* v, const attention_dims& d,
                     const context_parallel& cp) {
  const int64_t P = cp.size(), B = d.B, T = d.Tq, HD = d.HD, Tg = T * P;
  const int64_t NHl = d.NH / P, NKVl = d.NKV / P;
  const int64_t nq = B * T * NHl * HD, nkv = B * T * NKVl * HD, nl = B * NHl * T;
  // token-sharded (all heads) -> head-sharded (all tokens)
  const int64_t per = nq + 2 * nkv;
  tensor send = tensor::empty({P * per}), recv = tensor::empty({P * per});
  for (int64_t s = 0; s < P; ++s) {
    float* base = send.data<float>() + s * per;
    copy_tokens({base, T, NHl, 0, 0}, {q, T, d.NH, 0, s * NHl}, B, T, NHl, HD);
    copy_tokens({base + nq, T, NKVl, 0, 0}, {k, T, d.NKV, 0, s * NKVl}, B, T, NKVl, HD);
    copy_tokens({base + nq + nkv, T, NKVl, 0, 0}, {v, T, d.NKV, 0, s * NKVl}, B, T, NKVl, HD);
  }
  all_to_all_equal(cp, recv, send, per);
  std::vector<float> qg(static_cast<size_t>(P * nq)), kg(static_cast<size_t>(P * nkv)), vg(kg.size());
  for (int64_t s = 0; s < P; ++s) {
    const float* base = recv.data<float>() + s * per;
    copy_tokens({qg.data(), Tg, NHl, s * T, 0}, {base, T, NHl, 0, 0}, B, T, NHl, HD);
    copy_tokens({kg.data(), Tg, NKVl, s * T, 0}, {base + nq, T, NKVl, 0, 0}, B, T, NKVl, HD);
    copy_tokens({vg.data(), Tg, NKVl, s * T, 0}, {base + nq + nkv, T, NKVl, 0, 0}, B, T, NKVl, HD);
  }
  attention_dims dg = d;
  dg.Tq = dg.Tk = Tg;
  dg.NH = NHl;
  dg.NKV = NKVl;
  dg.q_offset = -1;
  std::vector<float> og(qg.size()), lg(static_cast<size_t>(P * nl));
  kc::attention_forward(og.data(), lg.data(), qg.data(), kg.data(), vg.data(), dg);
  // head-sharded -> token-sharded: out and lse
  const int64_t per2 = nq + nl;
  tensor send2 = tensor::empty({P * per2}), recv2 = tensor::empty({P * per2});
  for (int64_t s = 0; s < P; ++s) {
    float* base = send2.data<float>() + s * per2;
    copy_tokens({base, T, NHl, 0, 0}, {og.data(), Tg, NHl, s * T, 0}, B, T, NHl, HD);
    copy_lse({base + nq, T, NHl, 0, 0}, {lg.data(), Tg, NHl, s * T, 0}, B, T, NHl);
  }
  all_to_all_equal(cp, recv2, send2, per2);
  for (int64_t s = 0; s < P; ++s) {
    const float* base = recv2.data<float>() + s * per2;
    copy_tokens({out, T, d.NH, 0, s * NHl}, {base, T, NHl, 0, 0}, B, T, NHl, HD);
    if (lse != nullptr) copy_lse({lse, T, d.NH, 0, s * NHl}, {base + nq, T, NHl, 0, 0}, B, T, NHl);
  }
}

void ulysses_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                      const float* v, const float* out, const float* lse, const attention_dims& d,
                      const context_parallel& cp) {
  const int64_t P = cp.size(), B = d.B, T = d.Tq, HD = d.HD, Tg = T * P;
  const int64_t NHl = d.NH / P, NKVl = d.NKV / P;
  const int64_t nq = B * T * NHl * HD, nkv = B * T * NKVl * HD, nl = B * NHl * T;
  // q, out, dout (query heads), k, v (kv heads), lse: token-sharded -> head-sharded
  const int64_t per = 3 * nq + 2 * nkv + nl;
  tensor send = tensor::empty({P * per}), recv = tensor::empty({P * per});
  const float* qsrc[3] = {q, out, dout};
  const float* kvsrc[2] = {k, v};
  for (int64_t s = 0; s < P; ++s) {
    float* base = send.data<float>() + s * per;
    for (int i = 0; i < 3; ++i)
      copy_tokens({base + i * nq, T, NHl, 0, 0}, {qsrc[i], T, d.NH, 0, s * NHl}, B, T, NHl, HD);
    for (int i = 0; i < 2; ++i)
      copy_tokens({base + 3 * nq + i * nkv, T, NKVl, 0, 0}, {kvsrc[i], T, d.NKV, 0, s * NKVl}, B, T, NKVl, HD);
    copy_lse({base + 3 * nq + 2 * nkv, T, NHl, 0, 0}, {lse, T, d.NH, 0, s * NHl}, B, T, NHl);
  }
  all_to_all_equal(cp, recv, send, per);
  std::vector<float> qg(static_cast<size_t>(3 * P * nq)), kvg(static_cast<size_t>(2 * P * nkv)),
      lg(static_cast<size_t>(P * nl));
  float* qdst[3] = {qg.data(), qg.data() + P * nq, qg.data() + 2 * P * nq};  // q, out, dout
  float* kvdst[2] = {kvg.data(), kvg.data() + P * nkv};                       // k, v
  for (int64_t s = 0; s < P; ++s) {
    const float* base = recv.data<float>() + s * per;
    for (int i = 0; i < 3; ++i)
      copy_tokens({qdst[i], Tg, NHl, s * T, 0}, {base + i * nq, T, NHl, 0, 0}, B, T, NHl, HD);
    for (int i = 0; i < 2; ++i)
      copy_tokens({kvdst[i], Tg, NKVl, s * T, 0}, {base + 3 * nq + i * nkv, T, NKVl, 0, 0}, B, T, NKVl, HD);
    copy_lse({lg.data(), Tg, NHl, s * T, 0}, {base + 3 * nq + 2 * nkv, T, NHl, 0, 0}, B, T, NHl);
  }
  attention_dims dg = d;
  dg.Tq = dg.Tk = Tg;
  dg.NH = NHl;
  dg.NKV = NKVl;
  dg.q_offset = -1;
  std::vector<float> dqg(static_cast<size_t>(P * nq)), dkg(static_cast<size_t>(P * nkv)), dvg(dkg.size());
  kc::attention_backward(dqg.data(), dkg.data(), dvg.data(), qdst[2], qdst[0], kvdst[0], kvdst[1], qdst[1], lg.data(),
                         dg);
  // dq, dk, dv: head-sharded -> token-sharded
  const int64_t per2 = nq + 2 * nkv;
  tensor send2 = tensor::empty({P * per2}), recv2 = tensor::empty({P * per2});
  for (int64_t s = 0; s < P; ++s) {
    float* base = send2.data<float>() + s * per2;
    copy_tokens({base, T, NHl, 0, 0}, {dqg.data(), Tg, NHl, s * T, 0}, B, T, NHl, HD);
    copy_tokens({base + nq, T, NKVl, 0, 0}, {dkg.data(), Tg, NKVl, s * T, 0}, B, T, NKVl, HD);
    copy_tokens({base + nq + nkv, T, NKVl, 0, 0}, {dvg.data(), Tg, NKVl, s * T, 0}, B, T, NKVl, HD);
  }
  all_to_all_equal(cp, recv2, send2, per2);
  for (int64_t s = 0; s < P; ++s) {
    const float* base = recv2.data<float>() + s * per2;
    copy_tokens({dq, T, d.NH, 0, s * NHl}, {base, T, NHl, 0, 0}, B, T, NHl, HD);
    copy_tokens({dk, T, d.NKV, 0, s * NKVl}, {base + nq, T, NKVl, 0, 0}, B, T, NKVl, HD);
    copy_tokens({dv, T, d.NKV, 0, s * NKVl}, {base + nq + nkv, T, NKVl, 0, 0}, B, T, NKVl, HD);
  }
}

// ---- ring -----------------------------------------------------------------------------------

// (out, lse) <- the softmax over the union of both key sets: lse = log(e^lse + e^lse_j),
// out = out * e^(lse - lse') + out_j * e^(lse_j - lse'). lse is finite (the causal diagonal).
void lse_merge(float* out, float* lse, const float* out_j, const float* lse_j, const attention_dims& d) {
  const int64_t B = d.B, T = d.Tq, NH = d.NH, HD = d.HD;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t li = (b * NH + h) * T + t;
        const float la = lse[li], lb = lse_j[li];
        if (lb == -std::numeric_limits<float>::infinity()) continue;  // no visible key in chunk j
        const float m = std::max(la, lb);
        const float ln = m + std::log(std::exp(la - m) + std::exp(lb - m));
        const float wa = std::exp(la - ln), wb = std::exp(lb - ln);
        float* o = out + ((b * T + t) * NH + h) * HD;
        const float* oj = out_j + ((b * T + t) * NH + h) * HD;
        for (int64_t x = 0; x < HD; ++x) o[x] = wa * o[x] + wb * oj[x];
        lse[li] = ln;
      }
}

void ring_forward(float* out, float* lse, const float* q, const float* k, const float* v, const attention_dims& d,
                  const context_parallel& cp) {
  const int64_t P = cp.size(), r = cp.rank(), T = d.Tq;
  const int64_t nkv = d.B * T * d.NKV * d.HD;
  std::vector<float> lse_own;
  if (lse == nullptr) {
    lse_own.resize(static_cast<size_t>(d.B * d.NH * T));
    lse = lse_own.data();
  }
  attention_dims dd = d;
  dd.q_offset = -1;
  kc::attention_forward(out, lse, q, k, v, dd);  // the diagonal chunk, causal
  if (P == 1) return;
  tensor cur = tensor::empty({2 * nkv}), nxt = tensor::empty({2 * nkv});
  std::memcpy(cur.data<float>(), k, static_cast<size_t>(nkv) * sizeof(float));
  std::memcpy(cur.data<float>() + nkv, v, static_cast<size_t>(nkv) * sizeof(float));
  std::vector<float> out_j(static_cast<size_t>(d.B * T * d.NH * d.HD)), lse_j(static_cast<size_t>(d.B * d.NH * T));
  for (int64_t s = 1; s < P; ++s) {
    ring_shift(cp, cur, nxt, kTagRingFwd);
    std::swap(cur, nxt);
    const int64_t j = (r - s + P) % P;  // the chunk now held
    if (!ring_visible(j, r, T, d.window)) continue;
    attention_dims dj = d;
    dj.q_offset = (r - j) * T;
    kc::attention_forward(out_j.data(), lse_j.data(), q, cur.data<float>(), cur.data<float>() + nkv, dj);
    lse_merge(out, lse, out_j.data(), lse_j.data(), d);
  }
}

void ring_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                   const float* v, const float* out, const float* lse, const attention_dims& d,
                   const context_parallel& cp) {
  const int64_t P = cp.size(), r = cp.rank(), T = d.Tq;
  const int64_t nkv = d.B * T * d.NKV * d.HD, nq = d.B * T * d.NH * d.HD;
  // cur = [k, v, dk, dv] of the chunk held; dk, dv accumulate as it travels.
  tensor cur = tensor::empty({4 * nkv}), nxt = tensor::empty({4 * nkv});
  float* c = cur.data<float>();
  std::memcpy(c, k, static_cast<size_t>(nkv) * sizeof(float));
  std::memcpy(c + nkv, v, static_cast<size_t>(nkv) * sizeof(float));
  attention_dims dd = d;
  dd.q_offset = -1;
  kc::attention_backward(dq, c + 2 * nkv, c + 3 * nkv, dout, q, k, v, out, lse, dd);  // the diagonal
  const size_t kv_bytes = static_cast<size_t>(nkv) * sizeof(float);
  if (P == 1) {
    std::memcpy(dk, c + 2 * nkv, kv_bytes);
    std::memcpy(dv, c + 3 * nkv, kv_bytes);
    return;
  }
  std::vector<float> dq_j(static_cast<size_t>(nq)), dk_j(static_cast<size_t>(nkv)), dv_j(dk_j.size());
  for (int64_t s = 1; s < P; ++s) {
    ring_shift(cp, cur, nxt, kTagRingBwd);
    std::swap(cur, nxt);
    const int64_t j = (r - s + P) % P;
    if (!ring_visible(j, r, T, d.window)) continue;
    attention_dims dj = d;
    dj.q_offset = (r - j) * T;
    float* cj = cur.data<float>();
    kc::attention_backward(dq_j.data(), dk_j.data(), dv_j.data(), dout, q, cj, cj + nkv, out, lse, dj);
    for (int64_t i = 0; i < nq; ++i) dq[i] += dq_j[static_cast<size_t>(i)];
    for (int64_t i = 0; i < nkv; ++i) {
      cj[2 * nkv + i] += dk_j[static_cast<size_t>(i)];
      cj[3 * nkv + i] += dv_j[static_cast<size_t>(i)];
    }
  }
  // After P-1 hops rank r holds chunk r+1: one more hop of (dk, dv) brings every chunk home.
  tensor home = tensor::empty({2 * nkv}), mine = tensor::empty({2 * nkv});
  std::memcpy(home.data<float>(), cur.data<float>() + 2 * nkv, 2 * kv_bytes);
  ring_shift(cp, home, mine, kTagRingBwdHome);
  std::memcpy(dk, mine.data<float>(), kv_bytes);
  std::memcpy(dv, mine.data<float>() + nkv, kv_bytes);
}

void check_local_dims(const attention_dims& d, const context_parallel& cp, const char* where) {
  cp_check(cp, d.NH, d.NKV, where);
  TROUPE_CHECK(d.Tq == d.Tk && d.kv_stride_b == 0 && d.q_offset < 0, errc::invalid_argument,
               "{}: needs this rank's chunk as both queries and keys (Tq {} == Tk {}, dense k/v, default q_offset), "
               "got kv_stride_b {} q_offset {}",
               where, d.Tq, d.Tk, d.kv_stride_b, d.q_offset);
}

}  // namespace

void cp_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                          const attention_dims& d, const context_parallel& cp) {
  check_local_dims(d, cp, "cp_attention_forward");
  if (cp.mode == cp_mode::ulysses)
    ulysses_forward(out, lse, q, k, v, d, cp);
  else
    ring_forward(out, lse, q, k, v, d, cp);
}

void cp_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                           const float* v, const float* out, const float* lse, const attention_dims& d,
                           const context_parallel& cp) {
  check_local_dims(d, cp, "cp_attention_backward");
  TROUPE_CHECK(dq != nullptr && dk != nullptr && dv != nullptr && dout != nullptr && out != nullptr && lse != nullptr,
               errc::invalid_argument, "cp_attention_backward: dq, dk, dv, dout, out and lse are required");
  if (cp.mode == cp_mode::ulysses)
    ulysses_backward(dq, dk, dv, dout, q, k, v, out, lse, d, cp);
  else
    ring_backward(dq, dk, dv, dout, q, k, v, out, lse, d, cp);
}

}  // namespace troupe::parallel
