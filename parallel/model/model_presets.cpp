// parallel/model/model_presets.cpp
#include "parallel/model/model_presets.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "runtime/error.h"

namespace troupe::parallel {

const std::vector<std::string>& model_preset_names() {
  static const std::vector<std::string> names = {"tiny-llama", "tiny-mixtral", "tiny-qwen2-moe"};
  return names;
}

runtime::model_config model_preset(const std::string& name) {
  std::string j;
  if (name == "tiny-llama")
    j = R"({"model_type": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384,
      "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 2048, "rope_theta": 500000.0, "tie_word_embeddings": false,
      "bos_token_id": 1, "eos_token_id": 2,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 256}})";
  else if (name == "tiny-mixtral")
    j = R"({"model_type": "mixtral", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
      "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 2048, "rope_theta": 1000000.0, "num_local_experts": 4,
      "num_experts_per_tok": 2, "sliding_window": null, "bos_token_id": 1, "eos_token_id": 2})";
  else if (name == "tiny-qwen2-moe")
    j = R"({"model_type": "qwen2_moe", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384,
      "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
      "max_position_embeddings": 2048, "rope_theta": 1000000.0, "num_experts": 8, "num_experts_per_tok": 2,
      "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256, "norm_topk_prob": false,
      "decoder_sparse_step": 1, "use_sliding_window": false, "bos_token_id": 1, "eos_token_id": 2})";
  else
    TROUPE_THROW(runtime::errc::invalid_argument, "unknown model preset \"{}\"; choose one of: {}", name,
                 fmt::join(model_preset_names(), ", "));
  return runtime::parse_hf_config(j, "preset " + name);
}

}  // namespace troupe::parallel
