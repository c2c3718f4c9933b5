// kernels/cpu/paged_attention.cpp — paged causal GQA attention on the CPU: OpenMP over
// (query token, head); each item walks its sequence's blocks in order with an online softmax.
//
// Per item: q is scaled once, then per visible block the scores of its keys are computed, the
// running max / sum and the output accumulator are rescaled by exp(m_old - m_new) and the
// block's P @ V is added. Memory per thread: one block of scores.
#include "kernels/paged_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "runtime/error.h"

namespace troupe::kernels::cpu {

namespace {
using runtime::errc;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_dims(const paged_attention_dims& d) {
  TROUPE_CHECK(d.Nq > 0 && d.NH > 0 && d.NKV > 0 && d.HD > 0 && d.n_seqs > 0 && d.num_blocks > 0 &&
                   d.block_size > 0 && d.table_stride > 0,
               errc::invalid_argument,
               "paged_attention_forward: all of Nq {}, NH {}, NKV {}, HD {}, n_seqs {}, num_blocks {}, block_size {}, "
               "table_stride {} must be > 0",
               d.Nq, d.NH, d.NKV, d.HD, d.n_seqs, d.num_blocks, d.block_size, d.table_stride);
  TROUPE_CHECK(d.NH % d.NKV == 0, errc::invalid_argument,
               "paged_attention_forward: num heads {} must be a multiple of num kv heads {}", d.NH, d.NKV);
  TROUPE_CHECK(d.window >= 0, errc::invalid_argument,
               "paged_attention_forward: window {} must be >= 0 (0 = full causal)", d.window);
}

int64_t first_key(int64_t pos, int64_t window) { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; }

// Every table entry a query will read is a block of the cache (before any work starts).
void check_metadata(const int32_t* tables, const int32_t* token_seq, const int64_t* token_pos,
                    const paged_attention_dims& d) {
  for (int64_t t = 0; t < d.Nq; ++t) {
    const int64_t s = token_seq[t], p = token_pos[t];
    TROUPE_CHECK(s >= 0 && s < d.n_seqs, errc::invalid_argument,
                 "paged_attention_forward: query token {} names sequence {}, outside [0, {})", t, s, d.n_seqs);
    TROUPE_CHECK(p >= 0, errc::invalid_argument,
                 "paged_attention_forward: query token {} (sequence {}) has position {} < 0", t, s, p);
    TROUPE_CHECK(p / d.block_size < d.table_stride, errc::invalid_argument,
                 "paged_attention_forward: query token {} (sequence {}) at position {} needs block-table entry {}, "
                 "but rows hold {} blocks of {} tokens",
                 t, s, p, p / d.block_size, d.table_stride, d.block_size);
    const int32_t* row = tables + s * d.table_stride;
    for (int64_t b = first_key(p, d.window) / d.block_size; b <= p / d.block_size; ++b)
      TROUPE_CHECK(row[b] >= 0 && row[b] < d.num_blocks, errc::invalid_argument,
                   "paged_attention_forward: query token {} (sequence {}) reads block-table entry {} = {}, not a "
                   "block of the cache [0, {})",
                   t, s, b, row[b], d.num_blocks);
  }
}

// 8 partial sums in a fixed order: vectorisable without -ffast-math, same bits on every run.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int64_t r = 0; r < 8; ++r) acc[r] += a[i + r] * b[i + r];
  for (; i < n; ++i) acc[i & 7] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

struct item_scratch {
  std::vector<float> q, acc, s;
  item_scratch(int64_t HD, int64_t block_size) : q(HD), acc(HD), s(block_size) {}
};

// One (query token t, head h).
void attend(item_scratch& w, float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
            const int32_t* row, int64_t pos, int64_t h, float scale, const paged_attention_dims& d) {
  const int64_t HD = d.HD, bs = d.block_size, kv_row = d.NKV * HD;
  const int64_t kvh = h / (d.NH / d.NKV);
  float* qs = w.q.data();
  float* acc = w.acc.data();
  float* s = w.s.data();
  for (int64_t x = 0; x < HD; ++x) qs[x] = q[x] * scale, acc[x] = 0.0f;
  float m = kNegInf, l = 0.0f;
  const int64_t lo = first_key(pos, d.window);
  for (int64_t b = lo / bs; b <= pos / bs; ++b) {
    const int64_t j0 = b * bs > lo ? b * bs : lo;
    const int64_t j1 = (b + 1) * bs < pos + 1 ? (b + 1) * bs : pos + 1;  // keys [j0, j1) of this block
    const int64_t base = static_cast<int64_t>(row[b]) * bs * kv_row + kvh * HD;
    const float* kb = k_cache + base;
    const float* vb = v_cache + base;
    float mx = kNegInf;
    for (int64_t j = j0; j < j1; ++j) {
      s[j - j0] = dot(qs, kb + (j - b * bs) * kv_row, HD);
      mx = s[j - j0] > mx ? s[j - j0] : mx;
    }
    const float m_new = mx > m ? mx : m;
    const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
    float sum = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      s[j - j0] = std::exp(s[j - j0] - m_new);
      sum += s[j - j0];
    }
    l = l * alpha + sum;
    m = m_new;
    if (alpha != 1.0f)
      for (int64_t x = 0; x < HD; ++x) acc[x] *= alpha;
    for (int64_t j = j0; j < j1; ++j) {
      const float p = s[j - j0];
      const float* vr = vb + (j - b * bs) * kv_row;
      for (int64_t x = 0; x < HD; ++x) acc[x] += p * vr[x];
    }
  }
  const float inv = 1.0f / l;  // l >= 1: the key at pos itself is always visible
  for (int64_t x = 0; x < HD; ++x) out[x] = acc[x] * inv;
  if (lse != nullptr) *lse = m + std::log(l);
}

}  // namespace

void paged_attention_forward(float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, const int32_t* token_seq, const int64_t* token_pos,
                             const paged_attention_dims& d) {
  check_dims(d);
  check_metadata(block_tables, token_seq, token_pos, d);
  const float scale = d.scale != 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(d.HD));
  const int64_t items = d.Nq * d.NH;
#pragma omp parallel
  {
    item_scratch w(d.HD, d.block_size);
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t t = i / d.NH, h = i % d.NH;
      const int64_t off = (t * d.NH + h) * d.HD;
      attend(w, out + off, lse != nullptr ? lse + t * d.NH + h : nullptr, q + off, k_cache, v_cache,
             block_tables + static_cast<int64_t>(token_seq[t]) * d.table_stride, token_pos[t], h, scale, d);
    }
  }
}

}  // namespace troupe::kernels::cpu
