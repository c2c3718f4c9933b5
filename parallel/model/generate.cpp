// parallel/model/generate.cpp — greedy decoding: prefill, then one token per step.
#include "parallel/model/generate.h"

namespace troupe::parallel {

using runtime::errc;

int32_t argmax_token(const float* logits, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

generate_result generate_greedy(const decoder& dec, const std::vector<int32_t>& prompt, int64_t B, int64_t T0,
                                const generate_options& opt) {
  TROUPE_CHECK(B > 0 && T0 > 0 && static_cast<int64_t>(prompt.size()) == B * T0, errc::invalid_argument,
               "generate: prompt of {} ids for batch {} x {} tokens (need a non-empty prompt)", prompt.size(), B, T0);
  TROUPE_CHECK(opt.max_new_tokens >= 0, errc::invalid_argument, "generate: max_new_tokens {} must be >= 0",
               opt.max_new_tokens);
  const int64_t V = dec.config().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i)
    TROUPE_CHECK(prompt[i] >= 0 && prompt[i] < V, errc::out_of_range,
                 "generate: prompt id {} at position {} is outside the vocabulary [0, {})", prompt[i], i, V);
  generate_result r;
  r.batch = B;
  r.prompt_tokens = T0;
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    out[static_cast<size_t>(b)].assign(prompt.begin() + b * T0, prompt.begin() + (b + 1) * T0);
  if (opt.max_new_tokens > 0) {
    kv_cache cache(dec.config(), B, T0 + opt.max_new_tokens);
    runtime::tensor logits = dec.forward_cached(prompt.data(), B, T0, cache);
    std::vector<bool> done(static_cast<size_t>(B), false);
    std::vector<int32_t> next(static_cast<size_t>(B));
    for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
      bool all_done = true;
      for (int64_t b = 0; b < B; ++b) {
        const auto ub = static_cast<size_t>(b);
        next[ub] = done[ub] ? static_cast<int32_t>(opt.eos_token_id) : argmax_token(logits.data<float>() + b * V, V);
        out[ub].push_back(next[ub]);
        if (opt.eos_token_id >= 0 && next[ub] == opt.eos_token_id) done[ub] = true;
        all_done = all_done && done[ub];
      }
      ++r.new_tokens;
      if (all_done || step + 1 == opt.max_new_tokens) break;
      logits = dec.forward_cached(next.data(), B, 1, cache);
    }
  }
  r.ids.reserve(static_cast<size_t>(B * (T0 + r.new_tokens)));
  for (const auto& seq : out) r.ids.insert(r.ids.end(), seq.begin(), seq.end());
  return r;
}

}  // namespace troupe::parallel
