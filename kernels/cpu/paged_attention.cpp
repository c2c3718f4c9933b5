// kernels/cpu/paged_attention.cpp — paged causal GQA attention on the CPU: OpenMP over tiles of
// (consecutive query positions of one sequence) x (the query heads of one KV head), or over
// (query token, head) untiled; every row walks its sequence's blocks in order with an online
// softmax.
//
// Per row: q is scaled once, then per visible block the scores of its keys are computed, the
// running max / sum and the output accumulator are rescaled by exp(m_old - m_new) and the
// block's P @ V is added. A tile runs these steps block by block for all its rows, so a block's
// keys and values are loaded once per tile; row_step is the one place the arithmetic lives.
#include "kernels/paged_attention.h"

#include <cmath>
#include <limits>
#include <utility>
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
  TROUPE_CHECK(d.query_tile >= 0, errc::invalid_argument,
               "paged_attention_forward: query_tile {} must be >= 0 (0 = untiled)", d.query_tile);
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

// One row's state: scaled query, output accumulator, running max and sum.
struct row_state {
  float* q;
  float* acc;
  float m, l;
};

void row_init(row_state& r, const float* q, float scale, int64_t HD) {
  for (int64_t x = 0; x < HD; ++x) r.q[x] = q[x] * scale, r.acc[x] = 0.0f;
  r.m = kNegInf;
  r.l = 0.0f;
}

// Keys [j0, j1) of block b (kb, vb: the block's rows of this KV head): scores, online softmax
// update, P @ V. s: block_size floats of scratch.
void row_step(row_state& r, float* s, const float* kb, const float* vb, int64_t b, int64_t j0, int64_t j1,
              const paged_attention_dims& d) {
  const int64_t HD = d.HD, bs = d.block_size, kv_row = d.NKV * HD;
  float mx = kNegInf;
  for (int64_t j = j0; j < j1; ++j) {
    s[j - j0] = dot(r.q, kb + (j - b * bs) * kv_row, HD);
    mx = s[j - j0] > mx ? s[j - j0] : mx;
  }
  const float m_new = mx > r.m ? mx : r.m;
  const float alpha = std::exp(r.m - m_new);  // 0 on the first block (m = -inf)
  float sum = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    s[j - j0] = std::exp(s[j - j0] - m_new);
    sum += s[j - j0];
  }
  r.l = r.l * alpha + sum;
  r.m = m_new;
  if (alpha != 1.0f)
    for (int64_t x = 0; x < HD; ++x) r.acc[x] *= alpha;
  for (int64_t j = j0; j < j1; ++j) {
    const float p = s[j - j0];
    const float* vr = vb + (j - b * bs) * kv_row;
    for (int64_t x = 0; x < HD; ++x) r.acc[x] += p * vr[x];
  }
}

void row_finish(const row_state& r, float* out, float* lse, int64_t HD) {
  const float inv = 1.0f / r.l;  // l >= 1: the key at pos itself is always visible
  for (int64_t x = 0; x < HD; ++x) out[x] = r.acc[x] * inv;
  if (lse != nullptr) *lse = r.m + std::log(r.l);
}

// Keys [j0, j1) of block b visible from position pos (empty when the block is outside its range).
bool visible(int64_t pos, int64_t b, const paged_attention_dims& d, int64_t& j0, int64_t& j1) {
  const int64_t bs = d.block_size, lo = first_key(pos, d.window);
  if (b < lo / bs || b > pos / bs) return false;
  j0 = b * bs > lo ? b * bs : lo;
  j1 = (b + 1) * bs < pos + 1 ? (b + 1) * bs : pos + 1;
  return true;
}

struct scratch {
  std::vector<float> q, acc, s;
  std::vector<row_state> rows;
  scratch(int64_t R, int64_t HD, int64_t block_size)
      : q(static_cast<size_t>(R * HD)), acc(static_cast<size_t>(R * HD)), s(static_cast<size_t>(block_size)),
        rows(static_cast<size_t>(R)) {
    for (int64_t r = 0; r < R; ++r) rows[static_cast<size_t>(r)] = {q.data() + r * HD, acc.data() + r * HD, 0, 0};
  }
};

// One (query token t, head h): its blocks one after the other.
void attend(scratch& w, float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
            const int32_t* row, int64_t pos, int64_t h, float scale, const paged_attention_dims& d) {
  const int64_t bs = d.block_size, kv_row = d.NKV * d.HD, kvh = h / (d.NH / d.NKV);
  row_state& r = w.rows[0];
  row_init(r, q, scale, d.HD);
  for (int64_t b = first_key(pos, d.window) / bs; b <= pos / bs; ++b) {
    int64_t j0 = 0, j1 = 0;
    visible(pos, b, d, j0, j1);
    const int64_t base = static_cast<int64_t>(row[b]) * bs * kv_row + kvh * d.HD;
    row_step(r, w.s.data(), k_cache + base, v_cache + base, b, j0, j1, d);
  }
  row_finish(r, out, lse, d.HD);
}

// Tokens [t0, t0 + n) (one sequence, consecutive positions) x the query heads of KV head kvh:
// block by block, every row that sees the block takes its step (row_step) while it is in cache.
void attend_tile(scratch& w, float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
                 const int32_t* row, const int64_t* token_pos, int64_t t0, int64_t n, int64_t kvh, float scale,
                 const paged_attention_dims& d) {
  const int64_t G = d.NH / d.NKV, HD = d.HD, bs = d.block_size, kv_row = d.NKV * HD, R = n * G;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t t = t0 + i / G, h = kvh * G + i % G;
    row_init(w.rows[static_cast<size_t>(i)], q + (t * d.NH + h) * HD, scale, HD);
  }
  // Consecutive positions: the rows' block ranges overlap into one range, every block of it read
  // by some row (so every table entry touched was checked by check_metadata).
  const int64_t b_lo = first_key(token_pos[t0], d.window) / bs, b_hi = token_pos[t0 + n - 1] / bs;
  for (int64_t b = b_lo; b <= b_hi; ++b) {
    const int64_t base = static_cast<int64_t>(row[b]) * bs * kv_row + kvh * HD;
    for (int64_t i = 0; i < R; ++i) {
      int64_t j0 = 0, j1 = 0;
      if (!visible(token_pos[t0 + i / G], b, d, j0, j1)) continue;
      row_step(w.rows[static_cast<size_t>(i)], w.s.data(), k_cache + base, v_cache + base, b, j0, j1, d);
    }
  }
  for (int64_t i = 0; i < R; ++i) {
    const int64_t t = t0 + i / G, h = kvh * G + i % G;
    row_finish(w.rows[static_cast<size_t>(i)], out + (t * d.NH + h) * HD, lse != nullptr ? lse + t * d.NH + h : nullptr,
               HD);
  }
}

}  // namespace

void paged_attention_forward(float* out, float* lse, const float* q, const float* k_cache, const float* v_cache,
                             const int32_t* block_tables, const int32_t* token_seq, const int64_t* token_pos,
                             const paged_attention_dims& d) {
  check_dims(d);
  check_metadata(block_tables, token_seq, token_pos, d);
  const float scale = d.scale != 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(d.HD));
  if (d.query_tile <= 0) {  // untiled: one (token, head) per item
    const int64_t items = d.Nq * d.NH;
#pragma omp parallel
    {
      scratch w(1, d.HD, d.block_size);
#pragma omp for schedule(dynamic, 4)
      for (int64_t i = 0; i < items; ++i) {
        const int64_t t = i / d.NH, h = i % d.NH;
        const int64_t off = (t * d.NH + h) * d.HD;
        attend(w, out + off, lse != nullptr ? lse + t * d.NH + h : nullptr, q + off, k_cache, v_cache,
               block_tables + static_cast<int64_t>(token_seq[t]) * d.table_stride, token_pos[t], h, scale, d);
      }
    }
    return;
  }
  // Tiles: runs of up to query_tile tokens of one sequence at consecutive positions.
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (first token, tokens)
  int64_t longest = 1;
  for (int64_t t = 0; t < d.Nq;) {
    int64_t n = 1;
    while (n < d.query_tile && t + n < d.Nq && token_seq[t + n] == token_seq[t] &&
           token_pos[t + n] == token_pos[t + n - 1] + 1)
      ++n;
    tiles.emplace_back(t, n);
    longest = n > longest ? n : longest;
    t += n;
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * d.NKV, G = d.NH / d.NKV;
#pragma omp parallel
  {
    scratch w(longest * G, d.HD, d.block_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) {
      const auto [t0, n] = tiles[static_cast<size_t>(i / d.NKV)];
      attend_tile(w, out, lse, q, k_cache, v_cache, block_tables + static_cast<int64_t>(token_seq[t0]) * d.table_stride,
                  token_pos, t0, n, i % d.NKV, scale, d);
    }
  }
}

}  // namespace troupe::kernels::cpu
