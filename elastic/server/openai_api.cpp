// elastic/server/openai_api.cpp — see openai_api.h.
#include "elastic/server/openai_api.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

namespace troupe::elastic {

using json = nlohmann::json;

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw api_error(400, "invalid_request_error", message, param);
}

const char* type_name(const json& v) { return v.type_name(); }

double number(const json& body, const char* key, double def, double lo, double hi, bool lo_open = false) {
  if (!body.contains(key) || body[key].is_null()) return def;
  const json& v = body[key];
  if (!v.is_number()) bad(key, fmt::format("`{}` must be a number, got {}", key, type_name(v)));
  const double d = v.get<double>();
  if (!std::isfinite(d) || d > hi || (lo_open ? d <= lo : d < lo))
    bad(key, fmt::format("`{}` must be in {}{}, {}], got {}", key, lo_open ? "(" : "[", lo, hi, d));
  return d;
}

int64_t integer(const json& body, const char* key, int64_t def, int64_t lo, int64_t hi) {
  if (!body.contains(key) || body[key].is_null()) return def;
  const json& v = body[key];
  if (!v.is_number_integer()) bad(key, fmt::format("`{}` must be an integer, got {}", key, type_name(v)));
  const int64_t i = v.get<int64_t>();
  if (i < lo || i > hi) bad(key, fmt::format("`{}` must be in [{}, {}], got {}", key, lo, hi, i));
  return i;
}

bool boolean(const json& body, const char* key, bool def) {
  if (!body.contains(key) || body[key].is_null()) return def;
  if (!body[key].is_boolean()) bad(key, fmt::format("`{}` must be true or false, got {}", key, type_name(body[key])));
  return body[key].get<bool>();
}

std::vector<int32_t> token_ids(const json& v, const std::string& param) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number_integer() || v[i].get<int64_t>() < 0 || v[i].get<int64_t>() > std::numeric_limits<int32_t>::max())
      bad(param, fmt::format("`{}[{}]` must be a token id (a non-negative integer)", param, i));
    ids.push_back(static_cast<int32_t>(v[i].get<int64_t>()));
  }
  return ids;
}

std::string content_text(const json& c, size_t i) {
  const std::string param = fmt::format("messages[{}].content", i);
  if (c.is_string()) return c.get<std::string>();
  if (c.is_null()) return "";
  if (!c.is_array()) bad(param, fmt::format("`{}` must be a string or an array of text parts", param));
  std::string text;
  for (size_t k = 0; k < c.size(); ++k) {
    const json& part = c[k];
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
      bad(param, fmt::format("`{}[{}]` must be {{\"type\": \"text\", \"text\": \"...\"}} (only text is supported)",
                             param, k));
    text += part["text"].get<std::string>();
  }
  return text;
}

}  // namespace

completion_request parse_completion_request(const std::string& body_text, bool chat, const api_limits& limits) {
  if (body_text.size() > limits.max_body_bytes)
    throw api_error(413, "invalid_request_error",
                    fmt::format("the request body has {} bytes; this server accepts at most {}", body_text.size(),
                                limits.max_body_bytes));
  json body;
  try {
    body = json::parse(body_text);
  } catch (const json::parse_error& e) {
    bad("", fmt::format("the body is not valid JSON: {}", e.what()));
  }
  if (!body.is_object()) bad("", fmt::format("the body must be a JSON object, got {}", type_name(body)));
  completion_request r;
  r.chat = chat;
  if (body.contains("model") && !body["model"].is_null()) {
    if (!body["model"].is_string()) bad("model", "`model` must be a string");
    r.model = body["model"].get<std::string>();
  }
  if (chat) {
    if (!body.contains("messages")) bad("messages", "`messages` is required");
    const json& m = body["messages"];
    if (!m.is_array() || m.empty()) bad("messages", "`messages` must be a non-empty array of {role, content}");
    for (size_t i = 0; i < m.size(); ++i) {
      if (!m[i].is_object() || !m[i].contains("role") || !m[i]["role"].is_string())
        bad(fmt::format("messages[{}]", i), fmt::format("`messages[{}]` must be an object with a string `role`", i));
      const std::string role = m[i]["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
        bad(fmt::format("messages[{}].role", i),
            fmt::format("`messages[{}].role` '{}' is not one of system, user, assistant, tool, developer", i, role));
      r.messages.push_back({role == "developer" ? "system" : role, content_text(m[i].value("content", json()), i)});
    }
    r.max_tokens = limits.max_tokens;
    if (body.contains("max_completion_tokens") && !body["max_completion_tokens"].is_null())
      r.max_tokens = integer(body, "max_completion_tokens", r.max_tokens, 1, limits.max_tokens);
  } else {
    if (!body.contains("prompt")) bad("prompt", "`prompt` is required");
    const json& p = body["prompt"];
    if (p.is_string()) {
      r.prompt = p.get<std::string>();
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      r.prompt_ids = token_ids(p, "prompt");
      r.prompt_is_ids = true;
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.prompt = p[0].get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_array()) {
      r.prompt_ids = token_ids(p[0], "prompt[0]");
      r.prompt_is_ids = true;
    } else if (p.is_array() && p.size() > 1 && (p[0].is_string() || p[0].is_array())) {
      bad("prompt", fmt::format("`prompt` holds {} prompts; this server takes one per request", p.size()));
    } else {
      bad("prompt", "`prompt` must be a string or an array of token ids");
    }
    if (r.prompt_is_ids && r.prompt_ids.empty()) bad("prompt", "`prompt` has no tokens");
  }
  r.max_tokens = integer(body, "max_tokens", r.max_tokens, 1, limits.max_tokens);
  r.temperature = number(body, "temperature", 1.0, 0.0, 2.0);
  r.top_p = number(body, "top_p", 1.0, 0.0, 1.0, /*lo_open=*/true);
  r.top_k = integer(body, "top_k", 0, -1, std::numeric_limits<int32_t>::max());
  if (r.top_k == -1) r.top_k = 0;  // vLLM's "off"
  if (body.contains("seed") && !body["seed"].is_null()) {
    if (!body["seed"].is_number_integer()) bad("seed", "`seed` must be an integer");
    r.seed = static_cast<uint64_t>(body["seed"].get<int64_t>());
  }
  if (integer(body, "n", 1, 1, std::numeric_limits<int32_t>::max()) != 1) bad("n", "`n` must be 1 on this server");
  if (boolean(body, "echo", false)) bad("echo", "`echo` is not supported");
  if (body.contains("logprobs") && !body["logprobs"].is_null() && !(body["logprobs"].is_boolean() && !body["logprobs"].get<bool>()))
    bad("logprobs", "`logprobs` is not supported");
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& s = body["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 4) bad("stop", fmt::format("`stop` has {} strings; at most 4", s.size()));
      for (size_t i = 0; i < s.size(); ++i) {
        if (!s[i].is_string()) bad("stop", fmt::format("`stop[{}]` must be a string", i));
        r.stop.push_back(s[i].get<std::string>());
      }
    } else {
      bad("stop", "`stop` must be a string or an array of strings");
    }
    for (const auto& st : r.stop)
      if (st.empty()) bad("stop", "`stop` strings must not be empty");
  }
  if (body.contains("stop_token_ids") && !body["stop_token_ids"].is_null()) {
    if (!body["stop_token_ids"].is_array()) bad("stop_token_ids", "`stop_token_ids` must be an array of token ids");
    r.stop_token_ids = token_ids(body["stop_token_ids"], "stop_token_ids");
  }
  r.ignore_eos = boolean(body, "ignore_eos", false);
  r.stream = boolean(body, "stream", false);
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!so.is_object()) bad("stream_options", "`stream_options` must be an object");
    if (!r.stream) bad("stream_options", "`stream_options` is only allowed with `stream: true`");
    r.include_usage = boolean(so, "include_usage", false);
  }
  return r;
}

namespace {
json usage(int64_t prompt, int64_t completion) {
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}
json reason(const std::optional<std::string>& r) { return r ? json(*r) : json(nullptr); }
// Generated text may end inside a UTF-8 character (a byte-level tokenizer): never throw on it.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
}  // namespace

std::string completion_response_json(const completion_result& r, bool chat) {
  json j{{"id", r.id}, {"created", r.created}, {"model", r.model}, {"usage", usage(r.prompt_tokens, r.completion_tokens)}};
  if (chat) {
    j["object"] = "chat.completion";
    j["choices"] = json::array({{{"index", 0},
                                 {"message", {{"role", "assistant"}, {"content", r.text}}},
                                 {"logprobs", nullptr},
                                 {"finish_reason", r.finish_reason}}});
  } else {
    j["object"] = "text_completion";
    j["choices"] = json::array(
        {{{"index", 0}, {"text", r.text}, {"logprobs", nullptr}, {"finish_reason", r.finish_reason}}});
  }
  return dump(j);
}

std::string chunk_json(const std::string& id, int64_t created, const std::string& model, const std::string& text,
                       const std::optional<std::string>& finish_reason, bool chat, bool first) {
  json j{{"id", id}, {"created", created}, {"model", model}};
  if (chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || !finish_reason) delta["content"] = text;
    j["object"] = "chat.completion.chunk";
    j["choices"] =
        json::array({{{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", reason(finish_reason)}}});
  } else {
    j["object"] = "text_completion";
    j["choices"] =
        json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", reason(finish_reason)}}});
  }
  return dump(j);
}

std::string usage_chunk_json(const std::string& id, int64_t created, const std::string& model, int64_t prompt_tokens,
                             int64_t completion_tokens, bool chat) {
  json j{{"id", id},
         {"object", chat ? "chat.completion.chunk" : "text_completion"},
         {"created", created},
         {"model", model},
         {"choices", json::array()},
         {"usage", usage(prompt_tokens, completion_tokens)}};
  return dump(j);
}

std::string sse_event(const std::string& json_text) { return "data: " + json_text + "\n\n"; }

std::string error_json(const api_error& e) {
  json j{{"error",
          {{"message", e.what()},
           {"type", e.type},
           {"param", e.param.empty() ? json(nullptr) : json(e.param)},
           {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
  return dump(j);
}

std::string models_json(const std::vector<std::string>& ids, int64_t created, const std::string& owner) {
  json data = json::array();
  for (const auto& id : ids) data.push_back({{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", owner}});
  return dump(json{{"object", "list"}, {"data", data}});
}

}  // namespace troupe::elastic
