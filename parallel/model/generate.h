// parallel/model/generate.h — greedy decoding with a KV cache.
//
//   generate_options o{.max_new_tokens = 8, .eos_token_id = -1};
//   generate_result r = generate_greedy(dec, prompt_ids, /*B=*/1, /*T0=*/5, o);
//   // r.ids: (B, T0 + r.new_tokens), prompt first
//
// Invariants:
//   1. The prompt is prefilled in one forward over the cache, then one token per step;
//      the next token is the argmax of the last position's logits, the lowest id on ties.
//   2. Output equals greedy decoding by recomputing the full forward each step (up to
//      fp32 rounding of the logits).
//   3. A sequence that produced eos_token_id (>= 0) keeps emitting eos; decoding stops
//      when every sequence has or after max_new_tokens steps.
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/model/decoder.h"

namespace troupe::parallel {

struct generate_options {
  int64_t max_new_tokens = 16;
  int64_t eos_token_id = -1;  // < 0: never stop early
};

struct generate_result {
  std::vector<int32_t> ids;  // (B, T0 + new_tokens)
  int64_t batch = 0;
  int64_t prompt_tokens = 0;
  int64_t new_tokens = 0;
};

// logits: (V) -> the index of the largest value (the lowest on ties)
int32_t argmax_token(const float* logits, int64_t V);

// prompt: (B, T0)
generate_result generate_greedy(const decoder& dec, const std::vector<int32_t>& prompt, int64_t B, int64_t T0,
                                const generate_options& opt);

}  // namespace troupe::parallel
