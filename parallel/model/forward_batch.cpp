// parallel/model/forward_batch.cpp — the decoder over a flattened batch of sequences with a
// paged KV cache: the same layer as decoder_layer.cpp, with RoPE at each token's own position,
// K/V written to block slots and kernels::cpu::paged_attention_forward as the attention core.
#include "parallel/model/forward_batch.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/paged_attention.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;
using runtime::errc;
using runtime::tensor;

namespace {

// The batch flattened to Nq tokens, checked against the model and the store.
struct flat_batch {
  int64_t Nq = 0, table_stride = 1, rotary_dim = 0;
  std::vector<int32_t> ids, seq;   // (Nq) token id, sequence index
  std::vector<int64_t> pos, slot;  // (Nq) position, element offset of its K/V row in kv.k(l)
  std::vector<int32_t> tables;     // (n_seqs, table_stride), -1 padded
  std::vector<float> cos, sin;     // (Nq, rotary_dim / 2)
  std::vector<int64_t> last;       // (n_seqs) flat index of each sequence's last token
  std::vector<int64_t> rows;       // flat indices whose logits are returned (the last, or all of a sequence)
};

flat_batch flatten(const decoder& dec, std::span<const forward_batch_seq> seqs, const paged_kv_store& kv) {
  const model_config& c = dec.config();
  TROUPE_CHECK(dec.context_parallelism() == nullptr, errc::unsupported,
               "forward_batch: decoding does not run under context parallelism (call set_context_parallel(nullptr))");
  TROUPE_CHECK(!seqs.empty(), errc::invalid_argument, "forward_batch: the batch has no sequences");
  kv.check_config(c, "forward_batch");
  const int64_t bs = kv.block_size(), V = c.vocab_size, max_pos = c.max_position_embeddings;
  flat_batch f;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const forward_batch_seq& s = seqs[i];
    const auto n = static_cast<int64_t>(s.tokens.size());
    const int64_t end = s.start + n;  // one past the last position
    TROUPE_CHECK(n > 0, errc::invalid_argument, "forward_batch: sequence {} has no new tokens", i);
    TROUPE_CHECK(s.start >= 0, errc::invalid_argument, "forward_batch: sequence {}: start {} must be >= 0", i,
                 s.start);
    TROUPE_CHECK(end <= max_pos, errc::invalid_argument,
                 "forward_batch: sequence {}: positions [{}, {}) exceed the model's max_position_embeddings {}; "
                 "finish or truncate the sequence",
                 i, s.start, end, max_pos);
    const int64_t need = (end + bs - 1) / bs;
    TROUPE_CHECK(static_cast<int64_t>(s.block_table.size()) >= need, errc::invalid_argument,
                 "forward_batch: sequence {}: its block table has {} blocks of {} tokens, positions [0, {}) need {}; "
                 "allocate its blocks before the forward",
                 i, s.block_table.size(), bs, end, need);
    for (int64_t b = 0; b < need; ++b) {
      const int32_t id = s.block_table[static_cast<size_t>(b)];
      TROUPE_CHECK(id >= 0 && id < kv.num_blocks(), errc::invalid_argument,
                   "forward_batch: sequence {}: block table[{}] = {} is not a block of the store [0, {})", i, b, id,
                   kv.num_blocks());
    }
    for (int64_t t = 0; t < n; ++t) {
      const int32_t id = s.tokens[static_cast<size_t>(t)];
      TROUPE_CHECK(id >= 0 && id < V, errc::out_of_range,
                   "forward_batch: sequence {}: token {} (position {}) is {}, outside the vocabulary [0, {})", i, t,
                   s.start + t, id, V);
      f.ids.push_back(id);
      f.seq.push_back(static_cast<int32_t>(i));
      f.pos.push_back(s.start + t);
      f.slot.push_back(kv.slot(s.block_table[static_cast<size_t>((s.start + t) / bs)], (s.start + t) % bs));
    }
    f.table_stride = std::max(f.table_stride, need);
    // RoPE rows of these positions, scaled as decoder::forward_cached scales them (seq_len = end).
    std::vector<float> cs, sn;
    f.rotary_dim = rope_tables(c, s.start, n, end, &cs, &sn);
    f.cos.insert(f.cos.end(), cs.begin(), cs.end());
    f.sin.insert(f.sin.end(), sn.begin(), sn.end());
    f.Nq += n;
    f.last.push_back(f.Nq - 1);
    for (int64_t t = s.all_logits ? f.Nq - n : f.Nq - 1; t < f.Nq; ++t) f.rows.push_back(t);
  }
  // Two new tokens in one slot would overwrite each other (a block manager bug).
  std::vector<std::pair<int64_t, int32_t>> slots(static_cast<size_t>(f.Nq));
  for (size_t t = 0; t < slots.size(); ++t) slots[t] = {f.slot[t], f.seq[t]};
  std::sort(slots.begin(), slots.end());
  for (size_t t = 1; t < slots.size(); ++t)
    TROUPE_CHECK(slots[t].first != slots[t - 1].first, errc::invalid_argument,
                 "forward_batch: sequences {} and {} both write block {} row {}; give every sequence its own "
                 "blocks for new tokens",
                 slots[t - 1].second, slots[t].second, slots[t].first / kv.block_stride(),
                 slots[t].first % kv.block_stride() / kv.row());
  f.tables.assign(seqs.size() * static_cast<size_t>(f.table_stride), -1);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t end = seqs[i].start + static_cast<int64_t>(seqs[i].tokens.size());
    std::copy_n(seqs[i].block_table.begin(), (end + bs - 1) / bs,
                f.tables.begin() + static_cast<int64_t>(i) * f.table_stride);
  }
  return f;
}

// Per-call transients of one layer, reused across layers.
struct layer_scratch {
  std::vector<float> xn, rstd, q, k, v, att, branch;
  mlp_activations mlp;
  moe_activations moe;
  layer_scratch(int64_t N, int64_t C, int64_t QD, int64_t KVD)
      : xn(static_cast<size_t>(N * C)), rstd(static_cast<size_t>(N)), q(static_cast<size_t>(N * QD)),
        k(static_cast<size_t>(N * KVD)), v(k.size()), att(q.size()), branch(xn.size()) {}
};

// x: (Nq, C) layer input -> layer output, in place (decoder_layer.cpp's layer_forward, paged).
void batch_layer(float* x, layer_scratch& s, const layer_params& L, const model_config& c, const flat_batch& f,
                 paged_kv_store& kv, int64_t layer, moe_runner* moe) {
  const int64_t N = f.Nq, C = c.hidden, NH = c.n_heads, NKV = c.n_kv_heads, HD = c.head_dim;
  const int64_t QD = NH * HD, KVD = NKV * HD;
  const float eps = static_cast<float>(c.rms_norm_eps);
  kc::rmsnorm_forward(s.xn.data(), s.rstd.data(), x, L.input_norm.data<float>(), N, C, eps);
  kc::matmul_forward(s.q.data(), s.xn.data(), L.q_w.data<float>(), fptr(L.q_b), N, C, QD);
  kc::matmul_forward(s.k.data(), s.xn.data(), L.k_w.data<float>(), fptr(L.k_b), N, C, KVD);
  kc::matmul_forward(s.v.data(), s.xn.data(), L.v_w.data<float>(), fptr(L.v_b), N, C, KVD);
  // One "sequence" of N tokens whose table row t is token t's own position.
  kc::rope_forward(s.q.data(), s.q.data(), f.cos.data(), f.sin.data(), 1, N, NH, HD, f.rotary_dim);
  kc::rope_forward(s.k.data(), s.k.data(), f.cos.data(), f.sin.data(), 1, N, NKV, HD, f.rotary_dim);
  float* K = kv.k(layer);
  float* Vc = kv.v(layer);
  const size_t row_bytes = static_cast<size_t>(KVD) * sizeof(float);
  for (int64_t t = 0; t < N; ++t) {
    std::memcpy(K + f.slot[static_cast<size_t>(t)], s.k.data() + t * KVD, row_bytes);
    std::memcpy(Vc + f.slot[static_cast<size_t>(t)], s.v.data() + t * KVD, row_bytes);
  }
  kernels::paged_attention_dims d;
  d.Nq = N;
  d.NH = NH;
  d.NKV = NKV;
  d.HD = HD;
  d.n_seqs = static_cast<int64_t>(f.last.size());
  d.num_blocks = kv.num_blocks();
  d.block_size = kv.block_size();
  d.table_stride = f.table_stride;
  d.window = c.sliding_window;
  kc::paged_attention_forward(s.att.data(), nullptr, s.q.data(), K, Vc, f.tables.data(), f.seq.data(), f.pos.data(),
                              d);
  kc::matmul_forward(s.branch.data(), s.att.data(), L.o_w.data<float>(), fptr(L.o_b), N, QD, C);
  for (int64_t i = 0; i < N * C; ++i) x[i] += s.branch[static_cast<size_t>(i)];
  kc::rmsnorm_forward(s.xn.data(), s.rstd.data(), x, L.post_norm.data<float>(), N, C, eps);
  if (L.is_moe && moe)
    moe->forward(layer, s.branch.data(), s.xn.data(), L, c, N);
  else if (L.is_moe)
    moe_forward(s.branch.data(), s.moe, s.xn.data(), L, c, N);
  else
    mlp_forward(s.branch.data(), s.mlp, s.xn.data(), L.gate_w, L.up_w, L.down_w, N, C, c.intermediate);
  for (int64_t i = 0; i < N * C; ++i) x[i] += s.branch[static_cast<size_t>(i)];
}

}  // namespace

void forward_batch_idle(const decoder& dec) {
  moe_runner* runner = dec.expert_parallelism();
  if (runner == nullptr) return;
  const model_config& c = dec.config();
  std::vector<float> out(static_cast<size_t>(c.hidden)), x(static_cast<size_t>(c.hidden));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const layer_params& L = dec.weights().layers[static_cast<size_t>(l)];
    if (L.is_moe) runner->forward(l, out.data(), x.data(), L, c, 0);
  }
}

void check_forward_batch(const decoder& dec, std::span<const forward_batch_seq> seqs, const paged_kv_store& kv) {
  (void)flatten(dec, seqs, kv);
}

tensor forward_batch(const decoder& dec, std::span<const forward_batch_seq> seqs, paged_kv_store& kv,
                     const forward_batch_options& opt) {
  const model_config& c = dec.config();
  const model_weights& w = dec.weights();
  const flat_batch f = flatten(dec, seqs, kv);  // every check before the first write
  const int64_t N = f.Nq, C = c.hidden, V = c.vocab_size;
  std::vector<float> x(static_cast<size_t>(N * C));
  kc::embedding_forward(x.data(), f.ids.data(), w.embed.data<float>(), N, C, V);
  layer_scratch s(N, C, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
  for (int64_t l = 0; l < c.n_layers; ++l)
    batch_layer(x.data(), s, w.layers[static_cast<size_t>(l)], c, f, kv, l, dec.expert_parallelism());
  if (opt.no_logits) return {};
  // Final norm and LM head on the rows that are returned only.
  const int64_t R = opt.all_logits ? N : static_cast<int64_t>(f.rows.size());
  std::vector<float> rows(static_cast<size_t>(R * C)), h(rows.size()), rstd(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = opt.all_logits ? r : f.rows[static_cast<size_t>(r)];
    std::memcpy(rows.data() + r * C, x.data() + t * C, static_cast<size_t>(C) * sizeof(float));
  }
  kc::rmsnorm_forward(h.data(), rstd.data(), rows.data(), w.final_norm.data<float>(), R, C,
                      static_cast<float>(c.rms_norm_eps));
  tensor logits = tensor::empty({R, V});
  kc::matmul_forward(logits.data<float>(), h.data(), w.lm_head_or_embed().data<float>(), nullptr, R, C, V);
  return logits;
}

}  // namespace troupe::parallel
