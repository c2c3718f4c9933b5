// runtime/rope_config.h — the RoPE settings of a model (HF rope_theta + rope_scaling),
// shared by the config loader (runtime/io/hf_config.h) and the kernels (kernels/rope.h).
#pragma once
#include <cstdint>

namespace troupe::runtime {

enum class rope_type { standard, linear, dynamic, yarn, llama3 };

struct rope_config {
  int64_t head_dim = 64;
  double theta = 10000.0;
  rope_type type = rope_type::standard;
  double factor = 1.0;                       // linear, dynamic, yarn, llama3
  int64_t max_position_embeddings = 2048;    // dynamic: the trained context
  int64_t original_max_position_embeddings = 0;  // yarn, llama3 (0 = max_position_embeddings)
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  double beta_fast = 32.0;                   // yarn
  double beta_slow = 1.0;                    // yarn
  double attention_factor = 0.0;             // yarn (0 = derive 0.1*ln(factor)+1)
  double mscale = 0.0, mscale_all_dim = 0.0; // yarn (deepseek style), 0 = unused
  double partial_rotary_factor = 1.0;        // fraction of head_dim that rotates
};

}  // namespace troupe::runtime
