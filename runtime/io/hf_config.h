// runtime/io/hf_config.h — HF transformers config.json for the llama, mistral, mixtral
// and qwen2_moe families, as one struct the model is built from.
//
//   model_config c = load_hf_config("model_dir/config.json");
//   c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.is_moe(), c.rope ...
//   std::string json = hf_config_to_json(c);   // round-trips through load
//
// Invariants:
//   1. Unknown model_type, a missing required key, a wrong JSON type or an impossible
//      value (hidden % n_heads != 0, n_heads % n_kv_heads != 0, top_k > n_experts,
//      rope factor <= 0, ...) throws errc::format naming the file and the key.
//   2. Optional keys take HF's defaults for that family (e.g. rms_norm_eps, rope_theta,
//      tie_word_embeddings = false, qwen2_moe attention bias = true). As in transformers,
//      an absent key takes the config class's default while JSON null takes the derived
//      value: num_key_value_heads absent -> llama n_heads, mistral/mixtral 8, qwen2_moe 16;
//      null -> n_heads. sliding_window null or 0 -> no window. eos_token_id may be a list
//      (the first is kept); bos/eos absent -> 1/2 (qwen2_moe: -1), null -> -1.
//   3. RoPE comes from rope_theta + rope_scaling (transformers 4) or rope_parameters
//      (transformers 5); rope.head_dim and rope.max_position_embeddings are filled in.
//   4. Valid but unsupported settings (hidden_act other than silu, llama mlp_bias,
//      qwen2_moe use_sliding_window, yarn truncate=false) throw errc::unsupported.
//   5. hf_config_to_json writes transformers-4 style keys (rope_theta + rope_scaling,
//      torch_dtype "float32"), loadable by transformers 4 and 5, and parses back equal.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/rope_config.h"

namespace troupe::runtime {

enum class model_family { llama, mistral, mixtral, qwen2_moe };

struct model_config {
  model_family family = model_family::llama;
  std::string model_type;            // as written in config.json
  int64_t vocab_size = 0;
  int64_t hidden = 0;                // hidden_size
  int64_t intermediate = 0;          // intermediate_size (dense MLP)
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;              // hidden / n_heads unless given
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;       // q/k/v/o bias (llama attention_bias; qwen2: q/k/v only)
  bool o_proj_bias = false;
  int64_t sliding_window = 0;        // mistral; 0 = none
  rope_config rope;         // theta, scaling type and its parameters, head_dim
  // MoE (mixtral, qwen2_moe)
  int64_t n_experts = 0;             // num_local_experts / num_experts
  int64_t top_k = 0;                 // num_experts_per_tok
  int64_t moe_intermediate = 0;      // expert FFN width (mixtral: intermediate_size)
  bool norm_topk_prob = true;        // mixtral always true
  int64_t shared_expert_intermediate = 0;  // qwen2_moe; 0 = no shared expert
  int64_t decoder_sparse_step = 1;   // qwen2_moe
  std::vector<int64_t> mlp_only_layers;    // qwen2_moe
  double router_aux_loss_coef = 0.0;
  int64_t bos_token_id = -1, eos_token_id = -1;

  bool is_moe() const { return n_experts > 0; }
  bool layer_is_moe(int64_t layer) const;  // qwen2_moe's sparse step and mlp_only_layers
};

const char* model_family_name(model_family f);
model_config load_hf_config(const std::string& path);
model_config parse_hf_config(const std::string& json_text, const std::string& label);
std::string hf_config_to_json(const model_config& c);

}  // namespace troupe::runtime
