// Greedy generation: equal to HF's generate() on every fixture, and KV-cache decoding
// equal to recomputing the full forward each step on random models.
#include <gtest/gtest.h>

#include <filesystem>

#include "model_test_util.h"
#include "parallel/model/generate.h"
#include "runtime/io/safetensors.h"

namespace {

using namespace troupe;
using parallel::decoder;
using parallel::model_weights;
using runtime::tensor;

class GenerateFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerateFixture, GreedyEqualsHF) {
  const std::string dir = model_test::fixture_dir(GetParam());
  ASSERT_TRUE(std::filesystem::exists(dir + "/expected.safetensors"))
      << dir << " is missing; run tests/fixtures/make_fixtures.py";
  model_weights w = model_weights::load(dir);
  auto ex = runtime::safetensors_file::open(dir + "/expected.safetensors");
  tensor expected = ex.get("generated_ids").to(runtime::dtype::i32);
  tensor input = ex.get("input_ids").to(runtime::dtype::i32);
  const int64_t T0 = 5, total = expected.size(1);
  ASSERT_EQ(expected.size(0), 1);
  std::vector<int32_t> prompt(input.data<int32_t>(), input.data<int32_t>() + T0);
  parallel::generate_options o;
  o.max_new_tokens = total - T0;
  const auto r = parallel::generate_greedy(decoder(w), prompt, 1, T0, o);
  std::vector<int32_t> want(expected.data<int32_t>(), expected.data<int32_t>() + total);
  EXPECT_EQ(r.ids, want);
}

INSTANTIATE_TEST_SUITE_P(HF, GenerateFixture, ::testing::ValuesIn(model_test::fixture_names()),
                         [](const auto& info) { return info.param; });

// Greedy decoding by recomputing the whole sequence each step (no cache).
std::vector<int32_t> greedy_recompute(const decoder& d, std::vector<int32_t> seq, int64_t B, int64_t T0, int64_t n,
                                      std::vector<float>* last_logits) {
  const int64_t V = d.config().vocab_size;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t T = T0 + s;
    tensor logits = d.forward_logits(seq.data(), B, T);
    std::vector<int32_t> next;
    for (int64_t b = 0; b < B; ++b) {
      const float* row = logits.data<float>() + (b * T + T - 1) * V;
      next.push_back(parallel::argmax_token(row, V));
      last_logits->insert(last_logits->end(), row, row + V);
    }
    std::vector<int32_t> grown;
    for (int64_t b = 0; b < B; ++b) {
      grown.insert(grown.end(), seq.begin() + b * T, seq.begin() + (b + 1) * T);
      grown.push_back(next[static_cast<size_t>(b)]);
    }
    seq = grown;
  }
  return seq;
}

class GenerateCache : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerateCache, KvCacheEqualsFullRecompute) {
  const auto cfg = model_test::micro_config(GetParam());
  const model_weights w = model_weights::random_init(cfg, 21, /*std=*/0.5f);
  const decoder dec(w);
  const int64_t B = 2, T0 = 3, n = 9, V = cfg.vocab_size;  // 12 > sliding window 3
  const auto prompt = model_test::random_ids(B * T0, V, 4);
  std::vector<float> ref_logits;
  const auto ref = greedy_recompute(dec, prompt, B, T0, n, &ref_logits);

  // Token by token through the cache, comparing the logits of every step.
  parallel::kv_cache cache(cfg, B, T0 + n);
  tensor logits = dec.forward_cached(prompt.data(), B, T0, cache);
  std::vector<int32_t> next(static_cast<size_t>(B));
  for (int64_t s = 0; s < n; ++s) {
    const double e = model_test::rel_err(logits.data<float>(), ref_logits.data() + s * B * V, B * V);
    EXPECT_LE(e, 1e-5) << "step " << s;
    for (int64_t b = 0; b < B; ++b) next[static_cast<size_t>(b)] = parallel::argmax_token(logits.data<float>() + b * V, V);
    if (s + 1 < n) logits = dec.forward_cached(next.data(), B, 1, cache);
  }
  parallel::generate_options o;
  o.max_new_tokens = n;
  const auto r = parallel::generate_greedy(dec, prompt, B, T0, o);
  EXPECT_EQ(r.ids, ref);
  EXPECT_EQ(r.new_tokens, n);
}

INSTANTIATE_TEST_SUITE_P(Micro, GenerateCache,
                         ::testing::Values("llama", "mistral_tied", "mixtral", "qwen2_moe"),
                         [](const auto& info) { return info.param; });

TEST(KvCache, ChunkedPrefillEqualsFullForward) {
  // Two chunks of 4 tokens through the cache (Tq = 4 < Tk = 8) vs one forward of 8.
  const auto cfg = model_test::micro_config("mistral_tied");
  const model_weights w = model_weights::random_init(cfg, 2, 0.5f);
  const decoder dec(w);
  const auto ids = model_test::random_ids(8, cfg.vocab_size, 9);
  tensor full = dec.forward_logits(ids.data(), 1, 8);
  parallel::kv_cache cache(cfg, 1, 8);
  dec.forward_cached(ids.data(), 1, 4, cache);
  tensor last = dec.forward_cached(ids.data() + 4, 1, 4, cache);
  EXPECT_EQ(cache.length(), 8);
  EXPECT_LE(model_test::rel_err(last.data<float>(), full.data<float>() + 7 * cfg.vocab_size, cfg.vocab_size), 1e-5);
  EXPECT_THROW(dec.forward_cached(ids.data(), 1, 1, cache), runtime::error);  // full
  EXPECT_EQ(cache.length(), 8);
}

TEST(Generate, EosStopsAndTiesPickTheLowestId) {
  const float row[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  EXPECT_EQ(parallel::argmax_token(row, 5), 1);
  const auto cfg = model_test::micro_config("llama");
  const model_weights w = model_weights::random_init(cfg, 21, 0.5f);
  const decoder dec(w);
  const auto prompt = model_test::random_ids(4, cfg.vocab_size, 4);
  parallel::generate_options o;
  o.max_new_tokens = 6;
  const auto free_run = parallel::generate_greedy(dec, prompt, 1, 4, o);
  o.eos_token_id = free_run.ids[5];  // the second generated token
  const auto r = parallel::generate_greedy(dec, prompt, 1, 4, o);
  const int64_t first = free_run.ids[4] == o.eos_token_id ? 1 : 2;
  EXPECT_EQ(r.new_tokens, first);
  EXPECT_EQ(std::vector<int32_t>(r.ids.begin(), r.ids.end()),
            std::vector<int32_t>(free_run.ids.begin(), free_run.ids.begin() + 4 + first));
  EXPECT_THROW(parallel::generate_greedy(dec, {0, 99}, 1, 2, o), runtime::error);  // id outside vocab
}

}  // namespace
