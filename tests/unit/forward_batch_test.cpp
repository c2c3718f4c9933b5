// forward_batch over a block-paged KV cache: mixed prefill/decode/chunked-prefill batches equal the
// full forward of each sequence, continuous-batching greedy decoding equals generate_greedy token for
// token, paged_attention_forward equals a double-precision reference, and bad batches are rejected
// without touching the cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>

#include "kernels/paged_attention.h"
#include "model_test_util.h"
#include "parallel/model/forward_batch.h"
#include "parallel/model/generate.h"

namespace {

using namespace troupe;
using parallel::decoder;
using parallel::forward_batch;
using parallel::forward_batch_options;
using parallel::forward_batch_seq;
using parallel::model_weights;
using parallel::paged_kv_store;
using runtime::errc;
using runtime::tensor;

std::vector<int32_t> shuffled_blocks(int64_t n, uint32_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
  return ids;
}

std::vector<int32_t> slice(const std::vector<int32_t>& v, int64_t b, int64_t e) {
  return std::vector<int32_t>(v.begin() + b, v.begin() + e);
}

// The logits forward_logits gives sequence `ids` (one batch row) at position p.
const float* ref_row(const tensor& full, int64_t p, int64_t V) { return full.data<float>() + p * V; }

class ForwardBatchFixture : public ::testing::TestWithParam<std::string> {};

// (a) A prefills 7 tokens from 0, B decodes position 11 (0..10 written by two earlier calls), C
// prefills a chunk [4, 9) after a first chunk [0, 4); shuffled non-contiguous blocks of 4 tokens.
TEST_P(ForwardBatchFixture, MixedBatchEqualsFullForward) {
  const model_weights w = model_weights::load(model_test::fixture_dir(GetParam()));
  const decoder dec(w);
  const int64_t V = dec.config().vocab_size, bs = 4;
  paged_kv_store kv(dec.config(), 24, bs);
  const auto a = model_test::random_ids(7, V, 1), b = model_test::random_ids(12, V, 2),
             c = model_test::random_ids(9, V, 3);
  const auto pool = shuffled_blocks(24, 7);  // dealt round-robin: A, B, C interleave
  const std::vector<int32_t> ta = {pool[0], pool[3]}, tb = {pool[1], pool[4], pool[6]},
                             tc = {pool[2], pool[5], pool[7]};
  const tensor fa = dec.forward_logits(a.data(), 1, 7), fb = dec.forward_logits(b.data(), 1, 12),
               fc = dec.forward_logits(c.data(), 1, 9);
  double worst = 0.0;
  const auto check = [&](const float* got, const tensor& full, int64_t p, const char* what) {
    const double e = model_test::rel_err(got, ref_row(full, p, V), V);
    worst = std::max(worst, e);
    EXPECT_LE(e, 1e-4) << what << " position " << p;
  };

  const auto b1 = slice(b, 0, 6), c1 = slice(c, 0, 4), b2 = slice(b, 6, 11);
  std::vector<forward_batch_seq> step1 = {{b1, 0, tb}, {c1, 0, tc}};
  tensor l1 = forward_batch(dec, step1, kv);
  ASSERT_EQ(l1.shape(), (runtime::shape_t{2, V}));
  check(l1.data<float>(), fb, 5, "B after step 1");
  check(l1.data<float>() + V, fc, 3, "C after step 1");
  std::vector<forward_batch_seq> step2 = {{b2, 6, tb}};
  check(forward_batch(dec, step2, kv).data<float>(), fb, 10, "B after step 2");

  const auto b3 = slice(b, 11, 12), c3 = slice(c, 4, 9);
  std::vector<forward_batch_seq> mixed = {{a, 0, ta}, {b3, 11, tb}, {c3, 4, tc}};
  tensor all = forward_batch(dec, mixed, kv, forward_batch_options{.all_logits = true});
  ASSERT_EQ(all.shape(), (runtime::shape_t{13, V}));
  for (int64_t t = 0; t < 7; ++t) check(all.data<float>() + t * V, fa, t, "A (all logits)");
  check(all.data<float>() + 7 * V, fb, 11, "B (all logits)");
  for (int64_t t = 0; t < 5; ++t) check(all.data<float>() + (8 + t) * V, fc, 4 + t, "C (all logits)");
  // Again, last tokens only (rewrites the same K/V).
  tensor last = forward_batch(dec, mixed, kv);
  ASSERT_EQ(last.shape(), (runtime::shape_t{3, V}));
  check(last.data<float>(), fa, 6, "A");
  check(last.data<float>() + V, fb, 11, "B");
  check(last.data<float>() + 2 * V, fc, 8, "C");
  std::printf("[ %s ] mixed batch: max rel err vs forward_logits %.3g\n", GetParam().c_str(), worst);
}

// One sequence's greedy schedule under continuous batching.
struct live_seq {
  std::vector<int32_t> ids;    // prompt, then generated tokens
  int64_t prompt = 0, max_new = 0, join = 0, chunk = 0, cached = 0;
  std::vector<int32_t> table;  // its blocks
  bool done() const { return static_cast<int64_t>(ids.size()) - prompt == max_new; }
};

// (b) Three prompts (3, 6, 10 tokens) decoded together; the third joins at step 1 and prefills in
// chunks of 4 next to the others' decode tokens; the first finishes early and its blocks (a LIFO
// free list) are reused by the third. Equals generate_greedy per sequence, token for token.
TEST_P(ForwardBatchFixture, ContinuousBatchingGreedyEqualsGenerate) {
  const model_weights w = model_weights::load(model_test::fixture_dir(GetParam()));
  const decoder dec(w);
  const int64_t V = dec.config().vocab_size, bs = 4;
  paged_kv_store kv(dec.config(), 12, bs);
  std::vector<int32_t> free_list = shuffled_blocks(12, 11);
  std::vector<live_seq> seqs(3);
  const int64_t prompt[3] = {3, 6, 10}, max_new[3] = {4, 8, 8}, join[3] = {0, 0, 1}, chunk[3] = {8, 8, 4};
  for (size_t i = 0; i < 3; ++i) {
    seqs[i].ids = model_test::random_ids(prompt[i], V, 20 + static_cast<uint32_t>(i));
    seqs[i].prompt = prompt[i], seqs[i].max_new = max_new[i], seqs[i].join = join[i], seqs[i].chunk = chunk[i];
  }
  int64_t reused = 0;
  std::vector<int32_t> freed;
  for (int64_t step = 0; step < 32; ++step) {
    std::vector<size_t> who;
    std::vector<std::vector<int32_t>> toks;
    for (size_t i = 0; i < 3; ++i) {
      live_seq& s = seqs[i];
      if (step < s.join || s.done()) continue;
      const int64_t end = s.cached < s.prompt ? std::min(s.cached + s.chunk, s.prompt)
                                              : static_cast<int64_t>(s.ids.size());
      while (static_cast<int64_t>(s.table.size()) * bs < end) {
        ASSERT_FALSE(free_list.empty());
        s.table.push_back(free_list.back());
        free_list.pop_back();
        reused += std::count(freed.begin(), freed.end(), s.table.back());
      }
      who.push_back(i);
      toks.push_back(slice(s.ids, s.cached, end));
    }
    if (who.empty()) break;
    std::vector<forward_batch_seq> batch;
    for (size_t j = 0; j < who.size(); ++j) batch.push_back({toks[j], seqs[who[j]].cached, seqs[who[j]].table});
    tensor logits = forward_batch(dec, batch, kv);
    for (size_t j = 0; j < who.size(); ++j) {
      live_seq& s = seqs[who[j]];
      s.cached += static_cast<int64_t>(toks[j].size());
      if (s.cached < s.prompt) continue;  // a prefill chunk that is not the last
      s.ids.push_back(parallel::argmax_token(logits.data<float>() + static_cast<int64_t>(j) * V, V));
      if (s.done()) {  // its blocks go back, to be handed out first
        free_list.insert(free_list.end(), s.table.rbegin(), s.table.rend());
        freed.insert(freed.end(), s.table.begin(), s.table.end());
        s.table.clear();
      }
    }
  }
  EXPECT_GT(reused, 0) << "the schedule was meant to reuse a finished sequence's blocks";
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(seqs[i].done()) << "sequence " << i;
    parallel::generate_options o;
    o.max_new_tokens = seqs[i].max_new;
    const auto r = parallel::generate_greedy(dec, slice(seqs[i].ids, 0, seqs[i].prompt), 1, seqs[i].prompt, o);
    EXPECT_EQ(seqs[i].ids, r.ids) << "sequence " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(HF, ForwardBatchFixture,
                         ::testing::Values("llama_gqa", "mistral_window", "mixtral_moe", "qwen2_moe"),
                         [](const auto& info) { return info.param; });

// A moe_runner that runs moe_forward here and records its calls (stands in for expert parallelism).
class recording_runner final : public parallel::moe_runner {
 public:
  std::vector<std::pair<int64_t, int64_t>> calls;  // (layer, N)
  void forward(int64_t layer, float* out, const float* x, const parallel::layer_params& L,
               const parallel::model_config& c, int64_t N) override {
    calls.emplace_back(layer, N);
    parallel::moe_activations a;
    parallel::moe_forward(out, a, x, L, c, N);
  }
  void backward(int64_t, float*, parallel::layer_params&, const float*, const float*, const parallel::layer_params&,
                const parallel::model_config&, int64_t) override {
    ADD_FAILURE() << "forward_batch must not run a backward";
  }
};

TEST(ForwardBatch, MoeLayersRunThroughTheExpertParallelRunner) {
  const model_weights w = model_weights::load(model_test::fixture_dir("qwen2_moe"));
  decoder dec(w);
  const int64_t V = dec.config().vocab_size;
  const auto a = model_test::random_ids(5, V, 4), b = model_test::random_ids(3, V, 5);
  const std::vector<int32_t> ta = {3, 1}, tb = {0};
  std::vector<forward_batch_seq> batch = {{a, 0, ta}, {b, 0, tb}};
  paged_kv_store kv_here(dec.config(), 4, 4), kv_ep(dec.config(), 4, 4);
  tensor here = forward_batch(dec, batch, kv_here);
  recording_runner ep;
  dec.set_expert_parallel(&ep);
  tensor via = forward_batch(dec, batch, kv_ep);
  std::vector<std::pair<int64_t, int64_t>> want;
  for (int64_t l = 0; l < dec.config().n_layers; ++l)
    if (w.layers[static_cast<size_t>(l)].is_moe) want.emplace_back(l, 8);
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(ep.calls, want);  // once per MoE layer, all 8 new tokens at once
  EXPECT_EQ(std::memcmp(here.data<float>(), via.data<float>(), here.nbytes()), 0);
}

// ---- (c) the kernel against a double-precision reference -------------------------------------

struct paged_case {
  kernels::paged_attention_dims d;
  std::vector<float> q, k, v;
  std::vector<int32_t> tables, seq;
  std::vector<int64_t> pos;
};

// 3 sequences (lengths 5, 14, 10) in shuffled blocks of 3 tokens; queries: a prefill of sequence 0,
// one decode token of sequence 1 and a chunk [7, 10) of sequence 2.
paged_case make_case(int64_t HD, int64_t window) {
  paged_case c;
  auto& d = c.d;
  d.NH = 6, d.NKV = 2, d.HD = HD, d.n_seqs = 3, d.num_blocks = 13, d.block_size = 3, d.table_stride = 5;
  d.window = window;
  const int64_t lens[3] = {5, 14, 10};
  const auto pool = shuffled_blocks(d.num_blocks, 3);
  c.tables.assign(static_cast<size_t>(d.n_seqs * d.table_stride), -1);
  size_t next = 0;
  for (int64_t s = 0; s < 3; ++s)
    for (int64_t b = 0; b * d.block_size < lens[s]; ++b) c.tables[static_cast<size_t>(s * d.table_stride + b)] = pool[next++];
  for (int64_t p = 0; p < 5; ++p) c.seq.push_back(0), c.pos.push_back(p);
  c.seq.push_back(1), c.pos.push_back(13);
  for (int64_t p = 7; p < 10; ++p) c.seq.push_back(2), c.pos.push_back(p);
  d.Nq = static_cast<int64_t>(c.seq.size());
  std::mt19937 rng(5);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  c.q.resize(static_cast<size_t>(d.Nq * d.NH * HD));
  c.k.resize(static_cast<size_t>(d.num_blocks * d.block_size * d.NKV * HD));
  c.v.resize(c.k.size());
  for (auto& x : c.q) x = 2.0f * n01(rng);
  for (auto& x : c.k) x = n01(rng);
  for (auto& x : c.v) x = n01(rng);
  return c;
}

// Softmax(q.k * scale) @ v in double over the keys of the sequence, found by its logical position.
void reference(std::vector<double>* out, std::vector<double>* lse, const paged_case& c) {
  const auto& d = c.d;
  const int64_t HD = d.HD, row = d.NKV * HD;
  out->assign(c.q.size(), 0.0);
  lse->assign(static_cast<size_t>(d.Nq * d.NH), 0.0);
  for (int64_t t = 0; t < d.Nq; ++t)
    for (int64_t h = 0; h < d.NH; ++h) {
      const int64_t p = c.pos[static_cast<size_t>(t)], kvh = h / (d.NH / d.NKV);
      const int64_t lo = d.window > 0 ? std::max<int64_t>(0, p - d.window + 1) : 0;
      const auto at = [&](const std::vector<float>& m, int64_t j) {
        const int64_t blk = c.tables[static_cast<size_t>(c.seq[static_cast<size_t>(t)] * d.table_stride + j / d.block_size)];
        return m.data() + (blk * d.block_size + j % d.block_size) * row + kvh * HD;
      };
      const float* q = c.q.data() + (t * d.NH + h) * HD;
      std::vector<double> s;
      double mx = -1e300;
      for (int64_t j = lo; j <= p; ++j) {
        double dot = 0;
        for (int64_t x = 0; x < HD; ++x) dot += static_cast<double>(q[x]) * at(c.k, j)[x];
        s.push_back(dot / std::sqrt(static_cast<double>(HD)));
        mx = std::max(mx, s.back());
      }
      double sum = 0;
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t j = lo; j <= p; ++j)
        for (int64_t x = 0; x < HD; ++x)
          (*out)[static_cast<size_t>((t * d.NH + h) * HD + x)] += s[static_cast<size_t>(j - lo)] / sum * at(c.v, j)[x];
      (*lse)[static_cast<size_t>(t * d.NH + h)] = mx + std::log(sum);
    }
}

TEST(PagedAttention, EqualsDoubleReference) {
  for (const int64_t HD : {8, 12})
    for (const int64_t window : {0, 4, 1}) {
      const paged_case c = make_case(HD, window);
      std::vector<float> out(c.q.size()), lse(static_cast<size_t>(c.d.Nq * c.d.NH));
      kernels::cpu::paged_attention_forward(out.data(), lse.data(), c.q.data(), c.k.data(), c.v.data(),
                                            c.tables.data(), c.seq.data(), c.pos.data(), c.d);
      std::vector<double> ro, rl;
      reference(&ro, &rl, c);
      double eo = 0, el = 0, mo = 0;
      for (size_t i = 0; i < out.size(); ++i) eo = std::max(eo, std::abs(out[i] - ro[i])), mo = std::max(mo, std::abs(ro[i]));
      for (size_t i = 0; i < lse.size(); ++i) el = std::max(el, std::abs(lse[i] - rl[i]) / std::max(1.0, std::abs(rl[i])));
      EXPECT_LE(eo / mo, 2e-6) << "HD " << HD << " window " << window;
      EXPECT_LE(el, 2e-6) << "HD " << HD << " window " << window;
      std::printf("[ paged ] HD %lld window %lld: out rel err %.3g, lse rel err %.3g\n", static_cast<long long>(HD),
                  static_cast<long long>(window), eo / mo, el);
      // A query's output does not depend on the rest of the batch (bitwise): the decode token alone.
      kernels::paged_attention_dims one = c.d;
      one.Nq = 1;
      std::vector<float> solo(static_cast<size_t>(c.d.NH * HD));
      kernels::cpu::paged_attention_forward(solo.data(), nullptr, c.q.data() + 5 * c.d.NH * HD, c.k.data(),
                                            c.v.data(), c.tables.data(), c.seq.data() + 5, c.pos.data() + 5, one);
      EXPECT_EQ(std::memcmp(solo.data(), out.data() + 5 * c.d.NH * HD, solo.size() * sizeof(float)), 0);
    }
}

// Invariant 5/7: every tiling (untiled, 1, 2, 3, 16 queries per tile) gives bitwise the same
// outputs and lse, with GQA (3 query heads per KV head), windows and chunks that cross blocks.
TEST(PagedAttention, EveryQueryTileIsBitwiseTheSame) {
  for (const int64_t window : {0, 4, 1}) {
    const paged_case c = make_case(12, window);
    std::vector<float> want(c.q.size()), want_lse(static_cast<size_t>(c.d.Nq * c.d.NH));
    kernels::paged_attention_dims d0 = c.d;
    d0.query_tile = 0;
    kernels::cpu::paged_attention_forward(want.data(), want_lse.data(), c.q.data(), c.k.data(), c.v.data(),
                                          c.tables.data(), c.seq.data(), c.pos.data(), d0);
    for (const int64_t tile : {1, 2, 3, 16}) {
      kernels::paged_attention_dims d = c.d;
      d.query_tile = tile;
      std::vector<float> out(c.q.size(), -7.0f), lse(want_lse.size(), -7.0f);
      kernels::cpu::paged_attention_forward(out.data(), lse.data(), c.q.data(), c.k.data(), c.v.data(),
                                            c.tables.data(), c.seq.data(), c.pos.data(), d);
      EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * sizeof(float)), 0)
          << "tile " << tile << " window " << window;
      EXPECT_EQ(std::memcmp(lse.data(), want_lse.data(), lse.size() * sizeof(float)), 0)
          << "tile " << tile << " window " << window;
    }
  }
}

// ---- (d) bad input --------------------------------------------------------------------------

void expect_error(const std::function<void()>& f, errc code, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; wanted one mentioning '" << needle << "'";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

std::vector<float> snapshot(const paged_kv_store& kv) {
  std::vector<float> s;
  for (int64_t l = 0; l < kv.num_layers(); ++l) {
    const size_t n = static_cast<size_t>(kv.num_blocks() * kv.block_stride());
    s.insert(s.end(), kv.k(l), kv.k(l) + n);
    s.insert(s.end(), kv.v(l), kv.v(l) + n);
  }
  return s;
}

TEST(ForwardBatch, BadBatchesAreRejectedAndLeaveTheCacheAlone) {
  const model_weights w = model_weights::load(model_test::fixture_dir("llama_gqa"));
  const decoder dec(w);
  const int64_t V = dec.config().vocab_size;
  paged_kv_store kv(dec.config(), 8, 4);
  const auto ids = model_test::random_ids(6, V, 8);
  const std::vector<int32_t> t0 = {5, 2}, t1 = {7}, t_bad = {6, 8};
  std::vector<forward_batch_seq> ok = {{ids, 0, t0}};
  forward_batch(dec, ok, kv);
  const auto before = snapshot(kv);
  const auto run = [&](std::vector<forward_batch_seq> b) { return [&dec, &kv, b] { forward_batch(dec, b, kv); }; };
  const auto two = slice(ids, 0, 2), one = slice(ids, 0, 1);
  // Sequence 1's table holds 1 block of 4 tokens, its positions [4, 6) need 2.
  expect_error(run({{two, 0, t0}, {two, 4, t1}}), errc::invalid_argument, "sequence 1: its block table has 1");
  const std::vector<int32_t> big(70, 3);
  expect_error(run({{two, 255, big}}), errc::invalid_argument, "sequence 0: positions [255, 257) exceed");
  expect_error(run({{one, 6, t0}, {ids, 0, t_bad}}), errc::invalid_argument, "sequence 1: block table[1] = 8");
  expect_error(run({{one, 6, t0}, {{}, 0, t1}}), errc::invalid_argument, "sequence 1 has no new tokens");
  expect_error(run({{one, -1, t0}}), errc::invalid_argument, "sequence 0: start -1");
  expect_error(run({}), errc::invalid_argument, "no sequences");
  const std::vector<int32_t> oov = {1, static_cast<int32_t>(V)};
  expect_error(run({{oov, 0, t1}}), errc::out_of_range, "sequence 0: token 1 (position 1) is 128");
  // Sequence 1 would write block 2 row 2, as does sequence 0 at position 6 (a block manager bug).
  const std::vector<int32_t> t_shared = {2};
  expect_error(run({{one, 6, t0}, {slice(ids, 0, 3), 0, t_shared}}), errc::invalid_argument,
               "sequences 0 and 1 both write block 2 row 2");
  paged_kv_store other(model_test::micro_config("llama"), 8, 4);
  expect_error([&] { forward_batch(dec, ok, other); }, errc::invalid_argument, "the paged KV store holds 2 layers x 1");
  EXPECT_EQ(snapshot(kv), before);

  // The kernel checks its metadata too.
  paged_case c = make_case(8, 0);
  std::vector<float> out(c.q.size());
  c.tables[1 * 5 + 4] = 13;  // sequence 1's block 4 (positions 12..14) is not a block
  expect_error([&] { kernels::cpu::paged_attention_forward(out.data(), nullptr, c.q.data(), c.k.data(), c.v.data(),
                                                           c.tables.data(), c.seq.data(), c.pos.data(), c.d); },
               errc::invalid_argument, "query token 5 (sequence 1) reads block-table entry 4 = 13");
  c.pos[0] = 15;  // needs table entry 5 of 5
  expect_error([&] { kernels::cpu::paged_attention_forward(out.data(), nullptr, c.q.data(), c.k.data(), c.v.data(),
                                                           c.tables.data(), c.seq.data(), c.pos.data(), c.d); },
               errc::invalid_argument, "query token 0 (sequence 0) at position 15 needs block-table entry 5");
}

TEST(PagedKvStore, LayoutAndBudget) {
  const auto cfg = model_test::micro_config("llama");  // 2 layers, 1 kv head, head dim 4
  EXPECT_EQ(paged_kv_store::bytes_per_block(cfg, 16), size_t{2 * 2 * 16 * 1 * 4 * 4});
  EXPECT_EQ(paged_kv_store::blocks_for_budget(cfg, 16, 10 * 1024 + 1023), 10);
  EXPECT_EQ(paged_kv_store::blocks_for_budget(cfg, 16, 1023), 0);
  paged_kv_store kv(cfg, 5, 16);
  EXPECT_EQ(kv.bytes(), 5 * paged_kv_store::bytes_per_block(cfg, 16));
  EXPECT_EQ(kv.k_tensor(1).shape(), (runtime::shape_t{5, 16, 1, 4}));
  EXPECT_EQ(kv.slot(3, 2), (3 * 16 + 2) * 4);
  kv.k(1)[kv.slot(3, 2) + 1] = 7.0f;
  kv.v(0)[kv.slot(3, 15) + 3] = -2.0f;
  kv.copy_block(3, 0);
  EXPECT_EQ(kv.k(1)[kv.slot(0, 2) + 1], 7.0f);
  EXPECT_EQ(kv.v(0)[kv.slot(0, 15) + 3], -2.0f);
  EXPECT_EQ(kv.k(0)[kv.slot(0, 2) + 1], 0.0f);
  expect_error([&] { kv.copy_block(0, 5); }, errc::out_of_range, "blocks 0 -> 5 outside [0, 5)");
  expect_error([&] { paged_kv_store(cfg, 0, 16); }, errc::invalid_argument, "num_blocks 0");
}

}  // namespace
