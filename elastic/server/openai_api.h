// elastic/server/openai_api.h — the OpenAI-compatible wire format of `troupe serve`: request
// bodies of /v1/completions and /v1/chat/completions parsed and checked into one struct,
// responses, server-sent-event chunks and error objects rendered (nlohmann-json). No I/O here.
//
//   api_limits lim{.max_body_bytes = 1 << 20, .max_tokens = 4096};
//   completion_request r = parse_completion_request(body, /*chat=*/true, lim);   // throws api_error
//   completion_result out{.id = "chatcmpl-1", .model = "m", .choices = {...}};
//   std::string json = completion_response_json(out, r);
//   sse_event(chunk_json(head, r, choice_delta{.index = 0, .text = "Hel"}, /*first=*/true));
//   error_json(api_error(400, "invalid_request_error", "temperature must be in [0, 2]", "temperature"));
//
// Invariants:
//   1. Every problem with a request is an api_error with an HTTP status (400 for anything the
//      client sent wrong, 413 for a body over the limit), OpenAI's type
//      ("invalid_request_error"), the offending parameter in `param` when there is one, and a
//      message saying what was wrong and what is allowed. Parsing never partially succeeds.
//   2. Every field is either implemented or refused: a field this server does not know, or knows
//      but does not implement (suffix, tools, functions, ...), is a 400 naming it. A field set to
//      null counts as absent.
//   3. Defaults follow OpenAI: max_tokens 16 for completions and the server's limit for chat,
//      temperature 1, top_p 1, n 1, best_of n, stream false. Extensions vLLM also accepts: top_k,
//      min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, add_special_tokens.
//   4. A completions prompt is a string, an array of token ids, or an array of either (one choice
//      group per prompt, in order: choice index = prompt index * n + sample); chat content is a
//      string or an array of {"type": "text"} parts, joined with "\n".
//   5. logprobs are the model's own (log-softmax of the raw logits, before penalties, temperature or
//      masks, as vLLM reports them); completions give `logprobs` alternatives per token, chat
//      `top_logprobs` when `logprobs` is true. With echo the prompt's tokens lead, the first
//      with a null logprob.
//   6. Rendered JSON is what the OpenAI clients parse: ids "cmpl-..." / "chatcmpl-...", object
//      "text_completion" / "chat.completion" / "chat.completion.chunk", usage with prompt,
//      completion and total tokens; the stream ends with `data: [DONE]`.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "elastic/engine/sampling.h"  // token_logprob

namespace troupe::elastic {

class api_error : public std::runtime_error {
 public:
  api_error(int status, std::string type, std::string message, std::string param = "", std::string code = "")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type;   // "invalid_request_error", "authentication_error", "server_error", ...
  std::string param;  // the offending field, "" when none
  std::string code;   // e.g. "context_length_exceeded", "model_not_found"
};

struct api_limits {
  size_t max_body_bytes = size_t{1} << 20;
  int64_t max_tokens = 4096;          // per request; also chat's default
  int64_t max_prompt_tokens = 32768;  // checked by the server after tokenizing
  int64_t max_choices = 128;          // prompts x best_of per request
  int64_t max_logprobs = 20;          // alternatives per token
};

struct chat_message {
  std::string role;     // system | user | assistant | tool
  std::string content;
};

// One completions prompt: text, or token ids.
struct prompt_input {
  std::string text;
  std::vector<int32_t> ids;
  bool is_ids = false;
};

struct completion_request {
  bool chat = false;
  std::string model;
  std::vector<prompt_input> prompts;   // completions: one or more (invariant 4)
  std::vector<chat_message> messages;  // chat
  bool add_generation_prompt = true;   // chat
  bool add_special_tokens = true;      // completions text: the tokenizer's BOS
  int64_t max_tokens = 16;             // 0 only with echo (the prompt's logprobs alone)
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;                   // 0 = off (extension)
  double min_p = 0.0;                  // extension
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;       // at most 64 (OpenAI: 4; lm_eval sends more)
  std::vector<int32_t> stop_token_ids; // extension
  bool ignore_eos = false;             // extension
  int64_t min_tokens = 0;              // extension: no eos / stop token before this many
  int64_t n = 1;                       // choices returned per prompt
  int64_t best_of = 1;                 // completions: sampled per prompt, the n most likely returned
  bool echo = false;                   // completions: the prompt leads the text (and the logprobs)
  int64_t logprobs = -1;               // alternatives per token; -1 = no logprobs
  double presence_penalty = 0, frequency_penalty = 0, repetition_penalty = 1;
  std::vector<std::pair<int32_t, double>> logit_bias;  // token id -> bias in [-100, 100]
  std::string response_format = "text";                // text | json_object | json_schema
  std::string json_schema;                              // json_schema: the schema (JSON text)
  bool stream = false;
  bool include_usage = false;          // stream_options.include_usage
  std::string user;                    // the end user's id (logged with the request id, nothing else)
};

// body -> the request (invariants 1-4); throws api_error.
completion_request parse_completion_request(const std::string& body, bool chat, const api_limits& limits);

// The raw bytes of a token id (special tokens by their name), for logprobs.
using token_namer = std::function<std::string(int32_t id)>;

struct completion_choice {
  int64_t index = 0;
  std::string text;                  // with echo: the prompt's text first
  std::string finish_reason;         // "stop" | "length" | "abort"
  std::vector<token_logprob> logprobs;  // with echo: the prompt's tokens first
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct completion_result {
  std::string id;
  int64_t created = 0;
  std::string model;
  std::vector<completion_choice> choices;  // in index order
  int64_t prompt_tokens = 0, completion_tokens = 0;  // usage: every prompt once, every choice's tokens
};

std::string completion_response_json(const completion_result& r, const completion_request& q,
                                     const token_namer& names);

// One streamed chunk of one choice: delta text (chat: delta.content; the first chunk of a choice
// also carries the role), its tokens' logprobs when asked, finish_reason on the last one.
struct choice_delta {
  int64_t index = 0;
  std::string text;
  std::vector<token_logprob> logprobs;
  int64_t text_offset = 0;  // completions: where this text starts in the choice's whole text
  std::optional<std::string> finish_reason;
};
struct stream_head {
  std::string id;
  int64_t created = 0;
  std::string model;
};
std::string chunk_json(const stream_head& h, const completion_request& q, const choice_delta& d, bool first,
                       const token_namer& names);
// The final usage-only chunk when stream_options.include_usage.
std::string usage_chunk_json(const stream_head& h, bool chat, int64_t prompt_tokens, int64_t completion_tokens);
std::string sse_event(const std::string& json);  // "data: <json>\n\n"
inline const char* sse_done() { return "data: [DONE]\n\n"; }
std::string error_json(const api_error& e);      // {"error": {"message", "type", "param", "code"}}
std::string models_json(const std::vector<std::string>& ids, int64_t created, const std::string& owner);

// The text shown for a token in logprobs (invariant 5): its bytes when valid UTF-8, else
// "bytes:\xNN..." (OpenAI's convention).
std::string logprob_token_text(const std::string& bytes);

}  // namespace troupe::elastic
