// runtime/io/hf_config_write.cpp — model_config -> a config.json that transformers loads
// (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM) and
// that parse_hf_config reads back to the same model_config.
#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "runtime/io/hf_config.h"

namespace troupe::runtime {

namespace {

const char* architecture_of(model_family f) {
  switch (f) {
    case model_family::llama:
      return "LlamaForCausalLM";
    case model_family::mistral:
      return "MistralForCausalLM";
    case model_family::mixtral:
      return "MixtralForCausalLM";
    case model_family::qwen2_moe:
      return "Qwen2MoeForCausalLM";
  }
  return "?";
}

nlohmann::ordered_json rope_scaling_json(const rope_config& r) {
  using nlohmann::ordered_json;
  switch (r.type) {
    case rope_type::standard:
      return nullptr;
    case rope_type::linear:
      return ordered_json{{"rope_type", "linear"}, {"factor", r.factor}};
    case rope_type::dynamic:
      return ordered_json{{"rope_type", "dynamic"}, {"factor", r.factor}};
    case rope_type::llama3:
      return ordered_json{{"rope_type", "llama3"},
                          {"factor", r.factor},
                          {"low_freq_factor", r.low_freq_factor},
                          {"high_freq_factor", r.high_freq_factor},
                          {"original_max_position_embeddings", r.original_max_position_embeddings}};
    case rope_type::yarn: {
      ordered_json j{{"rope_type", "yarn"},
                     {"factor", r.factor},
                     {"original_max_position_embeddings", r.original_max_position_embeddings},
                     {"beta_fast", r.beta_fast},
                     {"beta_slow", r.beta_slow}};
      if (r.attention_factor > 0) j["attention_factor"] = r.attention_factor;
      if (r.mscale > 0) j["mscale"] = r.mscale;
      if (r.mscale_all_dim > 0) j["mscale_all_dim"] = r.mscale_all_dim;
      return j;
    }
  }
  return nullptr;
}

}  // namespace

std::string hf_config_to_json(const model_config& c) {
  using nlohmann::ordered_json;
  ordered_json j;
  j["architectures"] = ordered_json::array({architecture_of(c.family)});
  j["model_type"] = model_family_name(c.family);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden;
  j["intermediate_size"] =
      c.family == model_family::mixtral && c.moe_intermediate > 0 ? c.moe_intermediate : c.intermediate;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope.theta;
  j["rope_scaling"] = rope_scaling_json(c.rope);
  if (c.rope.partial_rotary_factor != 1.0) j["partial_rotary_factor"] = c.rope.partial_rotary_factor;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id >= 0 ? ordered_json(c.bos_token_id) : ordered_json(nullptr);
  j["eos_token_id"] = c.eos_token_id >= 0 ? ordered_json(c.eos_token_id) : ordered_json(nullptr);
  j["torch_dtype"] = "float32";
  switch (c.family) {
    case model_family::llama:
      TROUPE_CHECK(c.attention_bias == c.o_proj_bias, errc::invalid_argument,
                   "hf_config_to_json: llama's attention_bias covers q/k/v and o together (got {} and {})",
                   c.attention_bias, c.o_proj_bias);
      j["attention_bias"] = c.attention_bias;
      j["mlp_bias"] = false;
      break;
    case model_family::mistral:
    case model_family::mixtral:
      j["sliding_window"] = c.sliding_window > 0 ? ordered_json(c.sliding_window) : ordered_json(nullptr);
      break;
    case model_family::qwen2_moe:
      j["qkv_bias"] = c.attention_bias;
      j["use_sliding_window"] = false;
      break;
  }
  if (c.family == model_family::mixtral) {
    j["num_local_experts"] = c.n_experts;
    j["num_experts_per_tok"] = c.top_k;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
  } else if (c.family == model_family::qwen2_moe) {
    j["num_experts"] = c.n_experts;
    j["num_experts_per_tok"] = c.top_k;
    j["moe_intermediate_size"] = c.moe_intermediate;
    j["shared_expert_intermediate_size"] = c.shared_expert_intermediate;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["decoder_sparse_step"] = c.decoder_sparse_step;
    j["mlp_only_layers"] = c.mlp_only_layers;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
  }
  return j.dump(2) + "\n";
}

}  // namespace troupe::runtime
