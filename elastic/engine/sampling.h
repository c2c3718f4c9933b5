// elastic/engine/sampling.h — per-request sampling (greedy, temperature, top-k, top-p, min-p),
// the logit processors before it (logit bias, min_tokens, repetition / frequency / presence
// penalties, a guided-decoding mask), logprobs, and stops.
//
//   sampling_params p{.temperature = 0.7, .top_p = 0.9, .seed = 42, .max_tokens = 64, .stop = {"\n\n"}};
//   validate_sampling_params(p);                 // errc::invalid_argument naming the field
//   sampler s(p);                                // one per request: owns its RNG and token counts
//   s.set_prompt(prompt_ids);                    // for repetition_penalty
//   int32_t tok = s.sample(logits, V);           // logits: (V); or with a mask and blocked ids
//   s.accept(tok);                               // counts for the penalties
//   token_logprob lp = logprob_of(logits, V, tok, /*k=*/5);   // raw log-softmax, 5 alternatives
//   stop_chunk c = stops.push(detokenized_text_of(tok));      // stream c.text; stop if c.stopped
//
// Invariants:
//   1. temperature 0 is greedy: the argmax of the processed logits, the lowest id on ties
//      (parallel::argmax_token); top_k == 1 gives the same token. Greedy draws nothing from the RNG.
//      Without processors (no bias, penalties, mask or blocked ids) the raw logits are used as given.
//   2. Processing, in vLLM's order: logit_bias added, the mask (0 = -inf) and blocked ids (-inf)
//      applied, then repetition_penalty (on prompt and generated ids: positive logits divided,
//      others multiplied), then frequency (x count) and presence penalties on generated ids.
//   3. Sampling: p = softmax(logits / T) in double; min_p drops ids below min_p x the largest p;
//      top-k keeps the k most probable ids, then top-p keeps the smallest set, in order of
//      probability (ties: lower id first), whose cumulative probability reaches top_p of what was
//      kept; the result is renormalised (sampling_probs) and one uniform in [0, 1) is drawn.
//   4. A sampler's tokens depend only on its seed, its own accepted tokens and the logits it is
//      given, never on other requests in the batch: the RNG is std::mt19937_64(seed), owned per
//      request, and the uniform is (rng() >> 11) * 2^-53, the same on every standard library.
//   5. logprob_of works on the raw logits (what vLLM reports by default): log-softmax in double,
//      the k alternatives most likely first (ties: lower id first).
//   6. stop_checker never streams text that a stop string could still start in: a suffix
//      of the pending text that is a proper prefix of some stop string is held back until
//      the next chunk decides it. When a stop string completes, the text before its
//      earliest occurrence is released and the rest (the stop string included) dropped.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace troupe::elastic {

class json_grammar;  // guided_json.h

struct sampling_params {
  double temperature = 1.0;  // [0, 2]; 0 = greedy
  int64_t top_k = 0;         // >= 0; 0 = off
  double top_p = 1.0;        // (0, 1]; 1 = off
  uint64_t seed = 0;         // per request
  int64_t max_tokens = 16;   // >= 1: generated tokens at most
  std::vector<std::string> stop;          // stop strings (non-empty), excluded from the output
  std::vector<int32_t> stop_token_ids;    // stop on any of these (as on eos)
  bool ignore_eos = false;                // keep going past the eos token
  int64_t min_tokens = 0;                 // [0, max_tokens]: eos and stop ids blocked before this many
  double min_p = 0;                       // [0, 1]; 0 = off
  double presence_penalty = 0;            // [-2, 2]
  double frequency_penalty = 0;           // [-2, 2]
  double repetition_penalty = 1;          // (0, 2]; 1 = off
  std::vector<std::pair<int32_t, float>> logit_bias;  // id -> bias in [-100, 100]
  int64_t logprobs = -1;         // per generated token: its raw logprob and this many alternatives; -1 = none
  int64_t prompt_logprobs = -1;  // the same for the prompt's tokens (max_tokens may then be 0); -1 = none
  std::shared_ptr<const json_grammar> grammar;  // guided decoding (guided_json.h); null = free text
  std::string grammar_source;  // what grammar was compiled from: "json_object" or "json_schema:<schema>"
};

// One token's logprobs: its own and the most likely alternatives (most likely first).
struct token_logprob {
  int32_t id = 0;
  float logprob = 0;  // NaN: none (a prompt's first token)
  std::vector<std::pair<int32_t, float>> top;
};

// logits: (V) raw -> token's log-softmax and the k most likely ids (invariant 5).
token_logprob logprob_of(const float* logits, int64_t V, int32_t token, int64_t k);

// The first invalid field, OpenAI style: {"temperature", "2.5 is greater than the maximum of 2 - 'temperature'"}.
struct sampling_param_error {
  std::string param;
  std::string message;
};
std::optional<sampling_param_error> check_sampling_params(const sampling_params& p);
// Throws errc::invalid_argument with check_sampling_params' message.
void validate_sampling_params(const sampling_params& p);

// logits: (V) -> the filtered, renormalised distribution sample() draws from: (V), zeros
// outside the kept set. With temperature 0, 1 at the argmax.
std::vector<double> sampling_probs(const float* logits, int64_t V, const sampling_params& p);

class sampler {
 public:
  explicit sampler(const sampling_params& p);  // validates p
  // The prompt's ids, for repetition_penalty (once, before the first sample).
  void set_prompt(std::span<const int32_t> prompt);
  // logits: (V) -> a token id in [0, V) (invariants 1-3). allowed: (V) or null, 0 = masked;
  // blocked: ids that may not come now (min_tokens: eos and stop ids). Throws on V < 1 or when no
  // id is left with a finite logit.
  int32_t sample(const float* logits, int64_t V, const uint8_t* allowed = nullptr,
                 std::span<const int32_t> blocked = {});
  // A token the sequence produced (the penalties count it).
  void accept(int32_t token);
  const sampling_params& params() const { return params_; }

 private:
  bool processes(const uint8_t* allowed, std::span<const int32_t> blocked) const;
  sampling_params params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> prompt_ids_;     // sorted, unique
  std::vector<std::pair<int32_t, int32_t>> counts_;  // generated id -> count, sorted by id
  std::vector<float> work_;             // scratch: processed logits
  std::vector<int32_t> order_;          // scratch: candidate ids
  std::vector<double> prob_;            // scratch: unnormalised probabilities
};

enum class finish_reason { none, stop, length };
// "stop", "length", or "" for none.
const char* finish_reason_name(finish_reason r);

// After the num_generated-th generated token `token` (num_generated >= 1): stop on eos
// (eos_token_id >= 0, unless ignore_eos) or a stop_token_id, length at max_tokens, else
// none. A stop token that is also the max_tokens-th token reports stop.
finish_reason token_finish_reason(const sampling_params& p, int32_t token, int64_t num_generated,
                                  int64_t eos_token_id);

struct stop_chunk {
  std::string text;     // safe to stream now
  bool stopped = false; // a stop string completed; nothing more will be released
  std::string stop;     // which one (the earliest occurrence)
};

class stop_checker {
 public:
  explicit stop_checker(std::vector<std::string> stops);  // empty strings are ignored
  // Appends newly detokenized text; returns the text that is now safe to stream.
  stop_chunk push(std::string_view text);
  // The end of generation (eos, length): releases the held-back text (empty once stopped).
  std::string flush();
  bool stopped() const { return stopped_; }
  const std::string& held() const { return pending_; }  // text held back so far

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace troupe::elastic
