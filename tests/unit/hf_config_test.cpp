// tests/unit/hf_config_test.cpp — config.json parsing for llama, mistral, mixtral and
// qwen2_moe: realistic configs (modelled on the published Llama-3.1-8B, Mistral-7B-v0.1,
// Mixtral-8x7B-v0.1 and Qwen1.5-MoE-A2.7B files), HF defaults, every RoPE variant in
// both the transformers 4 (rope_scaling) and 5 (rope_parameters) forms, bad configs and
// their messages, and the hf_config_to_json round trip.
#include "runtime/io/hf_config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/error.h"

using namespace troupe::runtime;

namespace {

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

const char* llama3_8b = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

const char* mistral_7b = R"({
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
  "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000})";

const char* mixtral_8x7b = R"({
  "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
  "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
  "output_router_logits": false, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.02, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000})";

const char* qwen15_moe = R"({
  "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
  "model_type": "qwen2_moe", "num_attention_heads": 16, "num_hidden_layers": 24,
  "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936, "decoder_sparse_step": 1,
  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
  "num_experts": 60, "norm_topk_prob": false, "output_router_logits": false, "router_aux_loss_coef": 0.001})";

// `base` with the keys of `patch` replaced (null in the patch removes the key).
std::string patched(const char* base, const std::string& patch) {
  nlohmann::json j = nlohmann::json::parse(base);
  nlohmann::json p = nlohmann::json::parse(patch);
  for (auto it = p.begin(); it != p.end(); ++it) {
    if (it.value().is_null())
      j.erase(it.key());
    else
      j[it.key()] = it.value();
  }
  return j.dump();
}
// Like patched() but keeps JSON nulls (to test "key": null).
std::string with_null(const char* base, const std::string& key) {
  nlohmann::json j = nlohmann::json::parse(base);
  j[key] = nullptr;
  return j.dump();
}

std::string error_of(const std::string& text, errc code = errc::format) {
  try {
    parse_hf_config(text, "cfg/config.json");
  } catch (const error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

void expect_same(const model_config& a, const model_config& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.intermediate, b.intermediate);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.o_proj_bias, b.o_proj_bias);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.rope.head_dim, b.rope.head_dim);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.max_position_embeddings, b.rope.max_position_embeddings);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
  EXPECT_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
  EXPECT_EQ(a.rope.beta_fast, b.rope.beta_fast);
  EXPECT_EQ(a.rope.beta_slow, b.rope.beta_slow);
  EXPECT_EQ(a.rope.attention_factor, b.rope.attention_factor);
  EXPECT_EQ(a.rope.mscale, b.rope.mscale);
  EXPECT_EQ(a.rope.mscale_all_dim, b.rope.mscale_all_dim);
  EXPECT_EQ(a.rope.partial_rotary_factor, b.rope.partial_rotary_factor);
  EXPECT_EQ(a.n_experts, b.n_experts);
  EXPECT_EQ(a.top_k, b.top_k);
  EXPECT_EQ(a.moe_intermediate, b.moe_intermediate);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.shared_expert_intermediate, b.shared_expert_intermediate);
  EXPECT_EQ(a.decoder_sparse_step, b.decoder_sparse_step);
  EXPECT_EQ(a.mlp_only_layers, b.mlp_only_layers);
  EXPECT_EQ(a.router_aux_loss_coef, b.router_aux_loss_coef);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
}

}  // namespace

TEST(HfConfig, Llama3_8B) {
  model_config c = parse_hf_config(llama3_8b, "llama3/config.json");
  EXPECT_EQ(c.family, model_family::llama);
  EXPECT_STREQ(model_family_name(c.family), "llama");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden, 4096);
  EXPECT_EQ(c.intermediate, 14336);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.o_proj_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_id, 128001);  // first of the list
  EXPECT_FALSE(c.is_moe());
  EXPECT_FALSE(c.layer_is_moe(0));
  EXPECT_EQ(c.rope.type, rope_type::llama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.rope.max_position_embeddings, 131072);
  EXPECT_EQ(c.rope.head_dim, 128);
  EXPECT_EQ(c.rope.partial_rotary_factor, 1.0);
}

TEST(HfConfig, Mistral7B) {
  model_config c = parse_hf_config(mistral_7b, "mistral/config.json");
  EXPECT_EQ(c.family, model_family::mistral);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.rope.type, rope_type::standard);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.layer_is_moe(3));
  // Mistral-7B-v0.2+ writes "sliding_window": null, meaning no window.
  EXPECT_EQ(parse_hf_config(with_null(mistral_7b, "sliding_window"), "m").sliding_window, 0);
}

TEST(HfConfig, Mixtral8x7B) {
  model_config c = parse_hf_config(mixtral_8x7b, "mixtral/config.json");
  EXPECT_EQ(c.family, model_family::mixtral);
  EXPECT_TRUE(c.is_moe());
  EXPECT_EQ(c.n_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.moe_intermediate, 14336);  // mixtral's intermediate_size is the expert width
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.shared_expert_intermediate, 0);
  EXPECT_EQ(c.router_aux_loss_coef, 0.02);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.rope.theta, 1e6);
  for (int64_t l = 0; l < c.n_layers; ++l) EXPECT_TRUE(c.layer_is_moe(l)) << l;
}

TEST(HfConfig, Qwen15MoeA27B) {
  model_config c = parse_hf_config(qwen15_moe, "qwen/config.json");
  EXPECT_EQ(c.family, model_family::qwen2_moe);
  EXPECT_EQ(c.n_experts, 60);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.moe_intermediate, 1408);
  EXPECT_EQ(c.shared_expert_intermediate, 5632);
  EXPECT_EQ(c.intermediate, 5632);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_TRUE(c.attention_bias);   // q/k/v bias
  EXPECT_FALSE(c.o_proj_bias);     // no o_proj bias
  EXPECT_EQ(c.sliding_window, 0);  // use_sliding_window: false
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.bos_token_id, 151643);
  for (int64_t l = 0; l < c.n_layers; ++l) EXPECT_TRUE(c.layer_is_moe(l)) << l;
}

TEST(HfConfig, Qwen2MoeSparseStepAndMlpOnlyLayers) {
  model_config c = parse_hf_config(
      patched(qwen15_moe, R"({"num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [0, 3]})"), "q");
  // MoE iff (l + 1) % 2 == 0 and l not in {0, 3}: layers 1, 5, 7.
  std::vector<int64_t> moe;
  for (int64_t l = 0; l < 8; ++l)
    if (c.layer_is_moe(l)) moe.push_back(l);
  EXPECT_EQ(moe, (std::vector<int64_t>{1, 5, 7}));
  model_config dense = parse_hf_config(patched(qwen15_moe, R"({"num_experts": 0})"), "q");
  EXPECT_FALSE(dense.is_moe());
  EXPECT_FALSE(dense.layer_is_moe(1));
  EXPECT_FALSE(parse_hf_config(patched(qwen15_moe, R"({"qkv_bias": false})"), "q").attention_bias);
}

TEST(HfConfig, FamilyDefaults) {
  const std::string core =
      R"("vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8)";
  model_config l = parse_hf_config("{\"model_type\": \"llama\", " + core + "}", "l");
  EXPECT_EQ(l.n_kv_heads, 8);  // = num_attention_heads
  EXPECT_EQ(l.head_dim, 8);
  EXPECT_EQ(l.rms_norm_eps, 1e-6);
  EXPECT_EQ(l.rope.theta, 10000.0);
  EXPECT_EQ(l.max_position_embeddings, 2048);
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_FALSE(l.attention_bias);
  EXPECT_EQ(l.bos_token_id, 1);  // LlamaConfig's defaults
  EXPECT_EQ(l.eos_token_id, 2);
  EXPECT_EQ(l.rope.type, rope_type::standard);

  model_config m = parse_hf_config("{\"model_type\": \"mistral\", " + core + "}", "m");
  EXPECT_EQ(m.n_kv_heads, 8);  // MistralConfig's default
  EXPECT_EQ(m.sliding_window, 4096);
  EXPECT_EQ(m.max_position_embeddings, 131072);
  EXPECT_EQ(m.rope.theta, 10000.0);

  model_config x = parse_hf_config("{\"model_type\": \"mixtral\", " + core + "}", "x");
  EXPECT_EQ(x.rope.theta, 1e6);
  EXPECT_EQ(x.rms_norm_eps, 1e-5);
  EXPECT_EQ(x.n_experts, 8);
  EXPECT_EQ(x.top_k, 2);
  EXPECT_EQ(x.moe_intermediate, 96);
  EXPECT_EQ(x.sliding_window, 0);
  EXPECT_EQ(x.router_aux_loss_coef, 0.001);

  model_config q = parse_hf_config("{\"model_type\": \"qwen2_moe\", \"num_key_value_heads\": null, " + core + "}", "q");
  EXPECT_EQ(q.n_kv_heads, 8);  // null -> num_attention_heads
  EXPECT_EQ(q.rope.theta, 10000.0);
  EXPECT_EQ(q.n_experts, 60);
  EXPECT_EQ(q.top_k, 4);
  EXPECT_EQ(q.moe_intermediate, 1408);
  EXPECT_EQ(q.shared_expert_intermediate, 5632);
  EXPECT_FALSE(q.norm_topk_prob);
  EXPECT_EQ(q.decoder_sparse_step, 1);
  EXPECT_TRUE(q.attention_bias);
  EXPECT_EQ(q.max_position_embeddings, 32768);
  EXPECT_EQ(q.bos_token_id, -1);  // Qwen2MoeConfig: None
  EXPECT_EQ(q.eos_token_id, -1);
  EXPECT_EQ(parse_hf_config(with_null(llama3_8b, "eos_token_id"), "e").eos_token_id, -1);

  // Explicit head_dim wins over hidden / heads (and then hidden need not divide).
  model_config h = parse_hf_config(patched(mistral_7b, R"({"head_dim": 96, "hidden_size": 4000})"), "h");
  EXPECT_EQ(h.head_dim, 96);
  EXPECT_EQ(h.rope.head_dim, 96);
  EXPECT_EQ(parse_hf_config(with_null(mistral_7b, "head_dim"), "h").head_dim, 128);
  EXPECT_TRUE(
      parse_hf_config(patched(llama3_8b, R"({"attention_bias": true, "tie_word_embeddings": true})"), "b").o_proj_bias);
  EXPECT_EQ(parse_hf_config(patched(llama3_8b, R"({"eos_token_id": 7})"), "e").eos_token_id, 7);
}

TEST(HfConfig, RopeVariantsBothForms) {
  // transformers 4: rope_theta + rope_scaling with "type" or "rope_type".
  model_config lin =
      parse_hf_config(patched(mistral_7b, R"({"rope_scaling": {"type": "linear", "factor": 2.5}})"), "r");
  EXPECT_EQ(lin.rope.type, rope_type::linear);
  EXPECT_EQ(lin.rope.factor, 2.5);
  model_config dyn =
      parse_hf_config(patched(mistral_7b, R"({"rope_scaling": {"rope_type": "dynamic", "factor": 4}})"), "r");
  EXPECT_EQ(dyn.rope.type, rope_type::dynamic);
  EXPECT_EQ(dyn.rope.factor, 4.0);
  EXPECT_EQ(dyn.rope.max_position_embeddings, 32768);
  model_config yarn = parse_hf_config(
      patched(mistral_7b,
              R"({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 16, "mscale": 0.707, "mscale_all_dim": 0.707, "attention_factor": 1.2}})"),
      "r");
  EXPECT_EQ(yarn.rope.type, rope_type::yarn);
  EXPECT_EQ(yarn.rope.factor, 4.0);
  EXPECT_EQ(yarn.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(yarn.rope.beta_fast, 16.0);
  EXPECT_EQ(yarn.rope.beta_slow, 1.0);  // default
  EXPECT_EQ(yarn.rope.mscale, 0.707);
  EXPECT_EQ(yarn.rope.mscale_all_dim, 0.707);
  EXPECT_EQ(yarn.rope.attention_factor, 1.2);
  // yarn without factor: max_position_embeddings / original_max_position_embeddings (transformers 5).
  model_config yarn2 = parse_hf_config(
      patched(mistral_7b, R"({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 8192}})"), "r");
  EXPECT_EQ(yarn2.rope.factor, 4.0);
  model_config none = parse_hf_config(patched(mistral_7b, R"({"rope_scaling": {"rope_type": "default"}})"), "r");
  EXPECT_EQ(none.rope.type, rope_type::standard);
  EXPECT_EQ(parse_hf_config(with_null(llama3_8b, "rope_scaling"), "r").rope.type, rope_type::standard);

  // transformers 5: rope_parameters carries rope_theta and the scaling together.
  model_config v5 = parse_hf_config(patched(llama3_8b, R"({"rope_scaling": null, "rope_theta": null,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})"),
                                    "r");
  EXPECT_EQ(v5.rope.type, rope_type::llama3);
  EXPECT_EQ(v5.rope.theta, 500000.0);
  EXPECT_EQ(v5.rope.factor, 32.0);
  model_config v5d = parse_hf_config(
      patched(mistral_7b, R"({"rope_theta": null, "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}})"),
      "r");
  EXPECT_EQ(v5d.rope.type, rope_type::standard);
  EXPECT_EQ(v5d.rope.theta, 77.0);
  // llama3 without original_max_position_embeddings takes max_position_embeddings (HF standardisation).
  model_config l3 = parse_hf_config(
      patched(
          mistral_7b,
          R"({"rope_parameters": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}})"),
      "r");
  EXPECT_EQ(l3.rope.original_max_position_embeddings, 32768);
  EXPECT_EQ(l3.rope.theta, 10000.0);  // from the top-level rope_theta

  // partial_rotary_factor at the top level or inside the block.
  EXPECT_EQ(parse_hf_config(patched(mistral_7b, R"({"partial_rotary_factor": 0.5})"), "r").rope.partial_rotary_factor,
            0.5);
  EXPECT_EQ(parse_hf_config(patched(mistral_7b, R"({"rope_parameters": {"rope_type": "default",
                                                    "partial_rotary_factor": 0.25}})"),
                            "r")
                .rope.partial_rotary_factor,
            0.25);
}

TEST(HfConfig, BadConfigsNameFileKeyAndFix) {
  std::string m = error_of(patched(llama3_8b, R"({"model_type": "gpt2"})"));
  EXPECT_HAS(m, "cfg/config.json");
  EXPECT_HAS(m, "model_type");
  EXPECT_HAS(m, "gpt2");
  EXPECT_HAS(m, "llama, mistral, mixtral and qwen2_moe");

  m = error_of(patched(llama3_8b, R"({"hidden_size": null})"));
  EXPECT_HAS(m, "\"hidden_size\"");
  EXPECT_HAS(m, "missing required key");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"model_type": null})")), "\"model_type\"");

  m = error_of(patched(llama3_8b, R"({"hidden_size": "4096"})"));
  EXPECT_HAS(m, "\"hidden_size\"");
  EXPECT_HAS(m, "integer");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rms_norm_eps": "small"})")), "\"rms_norm_eps\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"tie_word_embeddings": 1})")), "true or false");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"num_hidden_layers": 2.5})")), "\"num_hidden_layers\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"eos_token_id": "x"})")), "\"eos_token_id\"");

  m = error_of(patched(llama3_8b, R"({"hidden_size": 4001})"));
  EXPECT_HAS(m, "\"hidden_size\"");
  EXPECT_HAS(m, "set head_dim");
  m = error_of(patched(llama3_8b, R"({"num_key_value_heads": 5})"));
  EXPECT_HAS(m, "\"num_key_value_heads\"");
  EXPECT_HAS(m, "32");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"num_key_value_heads": 0})")), "\"num_key_value_heads\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"vocab_size": 0})")), "\"vocab_size\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"intermediate_size": -5})")), "\"intermediate_size\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"head_dim": 0})")), "\"head_dim\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rms_norm_eps": 0})")), "\"rms_norm_eps\"");

  m = error_of(patched(mixtral_8x7b, R"({"num_experts_per_tok": 9})"));
  EXPECT_HAS(m, "\"num_experts_per_tok\"");
  EXPECT_HAS(m, "[1, 8]");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"num_experts_per_tok": 0})")), "\"num_experts_per_tok\"");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"decoder_sparse_step": 0})")), "\"decoder_sparse_step\"");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"mlp_only_layers": [24]})")), "\"mlp_only_layers\"");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"mlp_only_layers": "all"})")), "\"mlp_only_layers\"");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"moe_intermediate_size": 0})")), "\"moe_intermediate_size\"");

  m = error_of(patched(llama3_8b, R"({"rope_scaling": {"rope_type": "linear", "factor": 0}})"));
  EXPECT_HAS(m, "\"rope_scaling.factor\"");
  EXPECT_HAS(m, "> 0");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rope_scaling": {"rope_type": "linear", "factor": -2}})")),
             "\"rope_scaling.factor\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rope_scaling": {"rope_type": "linear"}})")), "\"rope_scaling.factor\"");
  m = error_of(patched(llama3_8b, R"({"rope_parameters": {"rope_type": "longrope", "factor": 2}})"));
  EXPECT_HAS(m, "\"rope_parameters.rope_type\"");
  EXPECT_HAS(m, "longrope");
  EXPECT_HAS(m, "linear, dynamic, yarn, llama3");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rope_scaling": {"rope_type": "llama3", "factor": 8}})")),
             "\"rope_scaling.low_freq_factor\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rope_scaling": 8})")), "\"rope_scaling\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"rope_theta": -1})")), "\"rope_theta\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"partial_rotary_factor": 1.5})")), "\"partial_rotary_factor\"");

  EXPECT_HAS(error_of("{\"model_type\": \"llama\",, }"), "malformed JSON");
  EXPECT_HAS(error_of("[1]"), "JSON object");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"hidden_act": "gelu"})"), errc::unsupported), "\"hidden_act\"");
  EXPECT_HAS(error_of(patched(llama3_8b, R"({"mlp_bias": true})"), errc::unsupported), "\"mlp_bias\"");
  EXPECT_HAS(error_of(patched(qwen15_moe, R"({"use_sliding_window": true})"), errc::unsupported),
             "\"use_sliding_window\"");
}

TEST(HfConfig, LoadFromFileAndDirectory) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / fmt::format("troupe_hfcfg_{}", ::getpid());
  fs::create_directories(dir);
  {
    std::ofstream out(dir / "config.json");
    out << mixtral_8x7b;
  }
  EXPECT_EQ(load_hf_config((dir / "config.json").string()).n_experts, 8);
  EXPECT_EQ(load_hf_config(dir.string()).top_k, 2);
  {
    std::ofstream out(dir / "config.json");
    out << patched(mixtral_8x7b, R"({"num_local_experts": 1})");
  }
  try {
    load_hf_config(dir.string());
    ADD_FAILURE();
  } catch (const error& e) {
    EXPECT_HAS(e.what(), (dir / "config.json").string());  // the file is named
  }
  try {
    load_hf_config((dir / "missing.json").string());
    ADD_FAILURE();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), "missing.json");
  }
  fs::remove_all(dir);
}

TEST(HfConfig, RoundTripThroughJson) {
  std::vector<std::string> configs = {
      llama3_8b,
      mistral_7b,
      mixtral_8x7b,
      qwen15_moe,
      with_null(mistral_7b, "sliding_window"),
      patched(llama3_8b, R"({"attention_bias": true, "tie_word_embeddings": true, "eos_token_id": null,
                             "partial_rotary_factor": 0.5, "head_dim": 64})"),
      patched(mistral_7b, R"({"rope_scaling": {"type": "linear", "factor": 2.5}})"),
      patched(mistral_7b, R"({"rope_scaling": {"type": "dynamic", "factor": 3}})"),
      patched(mistral_7b, R"({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                               4096, "beta_fast": 16, "mscale": 0.707, "mscale_all_dim": 1.0, "attention_factor": 1.2}})"),
      patched(qwen15_moe, R"({"num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [0, 3],
                              "norm_topk_prob": true, "qkv_bias": false, "shared_expert_intermediate_size": 0})"),
  };
  for (const auto& text : configs) {
    model_config a = parse_hf_config(text, "a");
    const std::string out = hf_config_to_json(a);
    nlohmann::json j = nlohmann::json::parse(out);
    EXPECT_EQ(j["torch_dtype"], "float32");
    EXPECT_EQ(j["model_type"], a.model_type);
    EXPECT_TRUE(j["architectures"].is_array());
    model_config b = parse_hf_config(out, "b");
    SCOPED_TRACE(out);
    expect_same(a, b);
  }
  EXPECT_EQ(nlohmann::json::parse(hf_config_to_json(parse_hf_config(mixtral_8x7b, "x")))["architectures"][0],
            "MixtralForCausalLM");
  EXPECT_EQ(nlohmann::json::parse(hf_config_to_json(parse_hf_config(qwen15_moe, "q")))["architectures"][0],
            "Qwen2MoeForCausalLM");
  EXPECT_EQ(nlohmann::json::parse(hf_config_to_json(parse_hf_config(llama3_8b, "l")))["rope_scaling"]["rope_type"],
            "llama3");
}
