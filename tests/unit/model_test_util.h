// tests/unit/model_test_util.h — shared helpers of the model tests: micro configs (as
// config.json text, parsed by the real loader), random token ids, relative error, and the
// HF fixture list.
//
//   model_config c = model_test::micro_config("qwen2_moe");
//   auto ids = model_test::random_ids(2 * 6, c.vocab_size, /*seed=*/3);
//   double e = model_test::rel_err(a, b, n);   // max|a-b| / max|b|
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "runtime/io/hf_config.h"

namespace model_test {

// The fixtures tests/fixtures/make_fixtures.py writes (config.json, model.safetensors,
// expected.safetensors each). A missing one is a test failure, not a skip.
inline const std::vector<std::string>& fixture_names() {
  static const std::vector<std::string> names = {"llama_gqa",   "llama_yarn_tied", "mistral_window",
                                                 "mixtral_moe", "qwen2_moe",       "qwen2_moe_sparse_step"};
  return names;
}

// TROUPE_FIXTURES_DIR (the environment variable) overrides the compiled-in directory, to
// test freshly generated fixtures before they are committed.
inline std::string fixture_dir(const std::string& name) {
  const char* env = std::getenv("TROUPE_FIXTURES_DIR");
  return std::string(env && *env ? env : TROUPE_FIXTURES_DIR) + "/" + name;
}

// Tiny configs covering every code path: biases, tied embeddings, a sliding window,
// scaled RoPE, partial rotary, Mixtral and Qwen2-MoE (shared expert, dense+sparse layers).
inline troupe::runtime::model_config micro_config(const std::string& kind) {
  std::string j;
  if (kind == "llama")
    j = R"({"model_type":"llama","vocab_size":17,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
           "num_attention_heads":2,"num_key_value_heads":1,"attention_bias":true,"rms_norm_eps":1e-5,
           "rope_theta":10000.0,"max_position_embeddings":16,
           "rope_scaling":{"rope_type":"llama3","factor":4.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                           "original_max_position_embeddings":4}})";
  else if (kind == "mistral_tied")
    j = R"({"model_type":"mistral","vocab_size":17,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
           "num_attention_heads":2,"num_key_value_heads":2,"head_dim":4,"sliding_window":3,
           "tie_word_embeddings":true,"max_position_embeddings":16,
           "rope_scaling":{"rope_type":"yarn","factor":2.0,"original_max_position_embeddings":8}})";
  else if (kind == "mixtral")
    j = R"({"model_type":"mixtral","vocab_size":17,"hidden_size":8,"intermediate_size":6,"num_hidden_layers":1,
           "num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":4,"num_experts_per_tok":2,
           "max_position_embeddings":16})";
  else if (kind == "qwen2_moe")
    j = R"({"model_type":"qwen2_moe","vocab_size":17,"hidden_size":8,"intermediate_size":10,"num_hidden_layers":2,
           "num_attention_heads":2,"num_key_value_heads":1,"num_experts":4,"num_experts_per_tok":2,
           "moe_intermediate_size":6,"shared_expert_intermediate_size":5,"norm_topk_prob":false,
           "decoder_sparse_step":2,"max_position_embeddings":16})";
  else  // "qwen2_moe_all": every layer sparse
    j = R"({"model_type":"qwen2_moe","vocab_size":17,"hidden_size":8,"intermediate_size":10,"num_hidden_layers":1,
           "num_attention_heads":2,"num_key_value_heads":1,"num_experts":4,"num_experts_per_tok":2,
           "moe_intermediate_size":6,"shared_expert_intermediate_size":5,"norm_topk_prob":true,
           "max_position_embeddings":16})";
  return troupe::runtime::parse_hf_config(j, "micro:" + kind);
}

inline std::vector<int32_t> random_ids(int64_t n, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// max |a - b| / max |b|  (b is the reference)
inline double rel_err(const float* a, const float* b, int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

}  // namespace model_test
