// elastic/server/openai_api.h — the OpenAI-compatible wire format of `troupe serve`: request
// bodies of /v1/completions and /v1/chat/completions parsed and checked into one struct,
// responses, server-sent-event chunks and error objects rendered (nlohmann-json). No I/O here.
//
//   api_limits lim{.max_body_bytes = 1 << 20, .max_tokens = 4096};
//   completion_request r = parse_completion_request(body, /*chat=*/true, lim);   // throws api_error
//   std::string out = completion_response_json(result, r.chat);
//   sse_event(chunk_json(id, created, model, "Hel", std::nullopt, /*chat=*/true, /*first=*/true));
//   error_json(api_error(400, "invalid_request_error", "temperature must be in [0, 2]", "temperature"));
//
// Invariants:
//   1. Every problem with a request is an api_error with an HTTP status (400 for anything the
//      client sent wrong, 413 for a body over the limit), OpenAI's type
//      ("invalid_request_error"), the offending parameter in `param` when there is one, and a
//      message saying what was wrong and what is allowed. Parsing never partially succeeds.
//   2. Defaults follow OpenAI: max_tokens 16 for completions and the server's limit for chat,
//      temperature 1, top_p 1, n 1, stream false. Extensions vLLM also accepts: top_k,
//      stop_token_ids, ignore_eos. Unknown fields are ignored (as vLLM does).
//   3. A prompt is a string or an array of token ids (one prompt only: arrays of prompts get a
//      400); chat content is a string or an array of {"type": "text", "text": ...} parts.
//   4. Rendered JSON is what the OpenAI clients parse: ids "cmpl-..." / "chatcmpl-...", object
//      "text_completion" / "chat.completion" / "chat.completion.chunk", usage with prompt,
//      completion and total tokens; the stream ends with `data: [DONE]`.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace troupe::elastic {

class api_error : public std::runtime_error {
 public:
  api_error(int status, std::string type, std::string message, std::string param = "", std::string code = "")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type;   // "invalid_request_error", "authentication_error", "server_error", ...
  std::string param;  // the offending field, "" when none
  std::string code;   // e.g. "context_length_exceeded"
};

struct api_limits {
  size_t max_body_bytes = size_t{1} << 20;
  int64_t max_tokens = 4096;          // per request; also chat's default
  int64_t max_prompt_tokens = 32768;  // checked by the server after tokenizing
};

struct chat_message {
  std::string role;     // system | user | assistant | tool
  std::string content;
};

struct completion_request {
  bool chat = false;
  std::string model;
  // completions: the prompt as text, or as token ids (prompt_is_ids)
  std::string prompt;
  std::vector<int32_t> prompt_ids;
  bool prompt_is_ids = false;
  std::vector<chat_message> messages;  // chat
  int64_t max_tokens = 16;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;                   // 0 = off (extension)
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;       // at most 4
  std::vector<int32_t> stop_token_ids; // extension
  bool ignore_eos = false;             // extension
  bool stream = false;
  bool include_usage = false;          // stream_options.include_usage
};

// body -> the request (invariants 1-3); throws api_error.
completion_request parse_completion_request(const std::string& body, bool chat, const api_limits& limits);

struct completion_result {
  std::string id;
  int64_t created = 0;
  std::string model;
  std::string text;
  std::string finish_reason;  // "stop" | "length" | "abort"
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

std::string completion_response_json(const completion_result& r, bool chat);
// One streamed chunk: delta text (chat: delta.content; the first chunk also carries the role),
// finish_reason on the last one.
std::string chunk_json(const std::string& id, int64_t created, const std::string& model, const std::string& text,
                       const std::optional<std::string>& finish_reason, bool chat, bool first);
// The final usage-only chunk when stream_options.include_usage.
std::string usage_chunk_json(const std::string& id, int64_t created, const std::string& model, int64_t prompt_tokens,
                             int64_t completion_tokens, bool chat);
std::string sse_event(const std::string& json);  // "data: <json>\n\n"
inline const char* sse_done() { return "data: [DONE]\n\n"; }
std::string error_json(const api_error& e);      // {"error": {"message", "type", "param", "code"}}
std::string models_json(const std::vector<std::string>& ids, int64_t created, const std::string& owner);

}  // namespace troupe::elastic
