// elastic/server/openai_api.cpp — see openai_api.h.
#include "elastic/server/openai_api.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace troupe::elastic {

using json = nlohmann::json;

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw api_error(400, "invalid_request_error", message, param);
}

const char* type_name(const json& v) { return v.type_name(); }

bool given(const json& body, const char* key) { return body.contains(key) && !body[key].is_null(); }

double number(const json& body, const char* key, double def, double lo, double hi, bool lo_open = false) {
  if (!given(body, key)) return def;
  const json& v = body[key];
  if (!v.is_number()) bad(key, fmt::format("`{}` must be a number, got {}", key, type_name(v)));
  const double d = v.get<double>();
  if (!std::isfinite(d) || d > hi || (lo_open ? d <= lo : d < lo))
    bad(key, fmt::format("`{}` must be in {}{}, {}], got {}", key, lo_open ? "(" : "[", lo, hi, d));
  return d;
}

int64_t integer(const json& body, const char* key, int64_t def, int64_t lo, int64_t hi) {
  if (!given(body, key)) return def;
  const json& v = body[key];
  if (!v.is_number_integer()) bad(key, fmt::format("`{}` must be an integer, got {}", key, type_name(v)));
  const int64_t i = v.get<int64_t>();
  if (i < lo || i > hi) bad(key, fmt::format("`{}` must be in [{}, {}], got {}", key, lo, hi, i));
  return i;
}

bool boolean(const json& body, const char* key, bool def) {
  if (!given(body, key)) return def;
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

// Text parts joined with "\n", as vLLM renders them for text-only models.
std::string content_text(const json& c, size_t i) {
  const std::string param = fmt::format("messages[{}].content", i);
  if (c.is_string()) return c.get<std::string>();
  if (c.is_null()) return "";
  if (!c.is_array()) bad(param, fmt::format("`{}` must be a string or an array of text parts", param));
  std::string text;
  for (size_t k = 0; k < c.size(); ++k) {
    const json& part = c[k];
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string() || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string())
      bad(param, fmt::format("`{}[{}]` must be {{\"type\": \"text\", \"text\": \"...\"}} (this model takes text only)",
                             param, k));
    if (k > 0) text += "\n";
    text += part["text"].get<std::string>();
  }
  return text;
}

// What each endpoint implements (invariant 2). Anything else is refused by name.
const std::set<std::string>& common_fields() {
  static const std::set<std::string> f = {
      "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
      "ignore_eos", "min_tokens", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
      "logit_bias", "logprobs", "stream", "stream_options", "user", "response_format", "skip_special_tokens"};
  return f;
}
const std::set<std::string>& completion_fields() {
  static const std::set<std::string> f = {"prompt", "best_of", "echo", "suffix", "add_special_tokens"};
  return f;
}
const std::set<std::string>& chat_fields() {
  static const std::set<std::string> f = {"messages",    "max_completion_tokens", "top_logprobs", "add_generation_prompt",
                                          "tools",       "tool_choice",           "parallel_tool_calls"};
  return f;
}
// Known OpenAI fields this server does not implement: refused with the reason.
const char* not_implemented(const std::string& key) {
  if (key == "suffix") return "text insertion (`suffix`) is not supported by this model or server";
  if (key == "tools" || key == "functions" || key == "function_call")
    return "tool and function calling is not implemented by this server";
  if (key == "audio" || key == "modalities") return "this server produces text only";
  if (key == "prediction") return "predicted outputs are not implemented by this server";
  if (key == "reasoning_effort") return "this model has no reasoning effort setting";
  if (key == "web_search_options") return "web search is not available on this server";
  if (key == "store" || key == "metadata") return "this server stores no completions";
  if (key == "service_tier") return "this server has one service tier";
  return nullptr;
}

void refuse_unknown_fields(const json& body, bool chat) {
  for (const auto& [key, v] : body.items()) {
    if (common_fields().count(key) || (chat ? chat_fields() : completion_fields()).count(key)) continue;
    if (v.is_null()) continue;  // null is "not given"
    if (const char* why = not_implemented(key)) bad(key, fmt::format("`{}`: {}", key, why));
    bad(key, fmt::format("`{}` is not a parameter of {} on this server", key,
                         chat ? "/v1/chat/completions" : "/v1/completions"));
  }
}

void parse_prompts(const json& body, completion_request& r) {
  if (!body.contains("prompt") || body["prompt"].is_null()) bad("prompt", "`prompt` is required");
  const json& p = body["prompt"];
  auto one = [&](const json& v, const std::string& param) {
    prompt_input in;
    if (v.is_string()) {
      in.text = v.get<std::string>();
    } else if (v.is_array() && !v.empty() && v[0].is_number_integer()) {
      in.ids = token_ids(v, param);
      in.is_ids = true;
    } else if (v.is_array() && v.empty()) {
      bad(param, fmt::format("`{}` has no tokens", param));
    } else {
      bad(param, fmt::format("`{}` must be a string or an array of token ids", param));
    }
    r.prompts.push_back(std::move(in));
  };
  if (p.is_string() || (p.is_array() && !p.empty() && p[0].is_number_integer())) {
    one(p, "prompt");
  } else if (p.is_array() && !p.empty()) {
    for (size_t i = 0; i < p.size(); ++i) one(p[i], fmt::format("prompt[{}]", i));
  } else {
    bad("prompt", "`prompt` must be a string, an array of token ids, or a non-empty array of either");
  }
}

void parse_logit_bias(const json& body, completion_request& r) {
  if (!given(body, "logit_bias")) return;
  const json& b = body["logit_bias"];
  if (!b.is_object()) bad("logit_bias", "`logit_bias` must be an object mapping token ids to biases in [-100, 100]");
  for (const auto& [k, v] : b.items()) {
    size_t used = 0;
    long long id = -1;
    try {
      id = std::stoll(k, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != k.size() || id < 0 || id > std::numeric_limits<int32_t>::max())
      bad("logit_bias", fmt::format("`logit_bias` key '{}' is not a token id", k));
    if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < -100 || v.get<double>() > 100)
      bad("logit_bias", fmt::format("`logit_bias[\"{}\"]` must be a number in [-100, 100]", k));
    r.logit_bias.emplace_back(static_cast<int32_t>(id), v.get<double>());
  }
}

void parse_response_format(const json& body, completion_request& r) {
  if (!given(body, "response_format")) return;
  const json& f = body["response_format"];
  if (!f.is_object() || !f.contains("type") || !f["type"].is_string())
    bad("response_format", "`response_format` must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}");
  const std::string type = f["type"].get<std::string>();
  if (type == "text" || type == "json_object") {
    r.response_format = type;
    return;
  }
  if (type != "json_schema")
    bad("response_format.type",
        fmt::format("`response_format.type` '{}' is not one of text, json_object, json_schema", type));
  if (!f.contains("json_schema") || !f["json_schema"].is_object())
    bad("response_format.json_schema", "`response_format.json_schema` must be an object with `name` and `schema`");
  const json& js = f["json_schema"];
  for (const auto& [k, v] : js.items())
    if (k != "name" && k != "schema" && k != "strict" && k != "description")
      bad("response_format.json_schema." + k,
          fmt::format("`response_format.json_schema.{}` is not a field of json_schema (name, schema, strict, "
                      "description)",
                      k));
  if (!js.contains("schema") || !(js["schema"].is_object() || js["schema"].is_boolean()))
    bad("response_format.json_schema.schema", "`response_format.json_schema.schema` must be a JSON Schema object");
  r.response_format = type;
  r.json_schema = js["schema"].dump();
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
  refuse_unknown_fields(body, chat);
  completion_request r;
  r.chat = chat;
  if (given(body, "model")) {
    if (!body["model"].is_string()) bad("model", "`model` must be a string");
    r.model = body["model"].get<std::string>();
  }
  if (given(body, "user")) {
    if (!body["user"].is_string()) bad("user", "`user` must be a string");
    r.user = body["user"].get<std::string>();
  }
  if (!boolean(body, "skip_special_tokens", true))
    bad("skip_special_tokens", "`skip_special_tokens: false` is not implemented: special tokens are never shown");
  if (chat) {
    if (!given(body, "messages")) bad("messages", "`messages` is required");
    const json& m = body["messages"];
    if (!m.is_array() || m.empty()) bad("messages", "`messages` must be a non-empty array of {role, content}");
    for (size_t i = 0; i < m.size(); ++i) {
      if (!m[i].is_object() || !m[i].contains("role") || !m[i]["role"].is_string())
        bad(fmt::format("messages[{}]", i), fmt::format("`messages[{}]` must be an object with a string `role`", i));
      for (const auto& [k, v] : m[i].items())
        if (k != "role" && k != "content" && k != "name" && !v.is_null())
          bad(fmt::format("messages[{}].{}", i, k),
              fmt::format("`messages[{}].{}` is not supported (tool calls are not implemented)", i, k));
      const std::string role = m[i]["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
        bad(fmt::format("messages[{}].role", i),
            fmt::format("`messages[{}].role` '{}' is not one of system, user, assistant, tool, developer", i, role));
      r.messages.push_back({role == "developer" ? "system" : role, content_text(m[i].value("content", json()), i)});
    }
    r.max_tokens = limits.max_tokens;
    r.max_tokens = integer(body, "max_completion_tokens", r.max_tokens, 1, limits.max_tokens);
    r.add_generation_prompt = boolean(body, "add_generation_prompt", true);
    if (given(body, "tools")) {
      const json& t = body["tools"];
      if (!t.is_array()) bad("tools", "`tools` must be an array");
      if (!t.empty()) bad("tools", fmt::format("`tools`: {}", not_implemented("tools")));
    }
    if (given(body, "tool_choice")) {
      const json& t = body["tool_choice"];
      if (!(t.is_string() && (t == "none" || t == "auto")))
        bad("tool_choice", "`tool_choice` can only be \"none\" or \"auto\" (no tools are implemented)");
    }
    (void)boolean(body, "parallel_tool_calls", true);  // checked; without tools it changes nothing
  } else {
    parse_prompts(body, r);
    r.add_special_tokens = boolean(body, "add_special_tokens", true);
    r.echo = boolean(body, "echo", false);
    if (given(body, "suffix") && !(body["suffix"].is_string() && body["suffix"].get<std::string>().empty()))
      bad("suffix", fmt::format("`suffix`: {}", not_implemented("suffix")));
  }
  r.max_tokens = integer(body, "max_tokens", r.max_tokens, r.echo ? 0 : 1, limits.max_tokens);
  r.temperature = number(body, "temperature", 1.0, 0.0, 2.0);
  r.top_p = number(body, "top_p", 1.0, 0.0, 1.0, /*lo_open=*/true);
  r.top_k = integer(body, "top_k", 0, -1, std::numeric_limits<int32_t>::max());
  if (r.top_k == -1) r.top_k = 0;  // vLLM's "off"
  r.min_p = number(body, "min_p", 0.0, 0.0, 1.0);
  if (given(body, "seed")) {
    if (!body["seed"].is_number_integer()) bad("seed", "`seed` must be an integer");
    r.seed = static_cast<uint64_t>(body["seed"].get<int64_t>());
  }
  r.presence_penalty = number(body, "presence_penalty", 0.0, -2.0, 2.0);
  r.frequency_penalty = number(body, "frequency_penalty", 0.0, -2.0, 2.0);
  r.repetition_penalty = number(body, "repetition_penalty", 1.0, 0.0, 2.0, /*lo_open=*/true);
  r.min_tokens = integer(body, "min_tokens", 0, 0, r.max_tokens);
  parse_logit_bias(body, r);
  r.n = integer(body, "n", 1, 1, limits.max_choices);
  r.best_of = chat ? r.n : integer(body, "best_of", r.n, 1, limits.max_choices);
  if (r.best_of < r.n) bad("best_of", fmt::format("`best_of` ({}) must be at least `n` ({})", r.best_of, r.n));
  const int64_t prompts = chat ? 1 : static_cast<int64_t>(r.prompts.size());
  if (prompts * r.best_of > limits.max_choices)
    bad(chat ? "n" : "best_of", fmt::format("{} prompt(s) x {} sample(s) = {} sequences; this server takes at most {} "
                                            "per request",
                                            prompts, r.best_of, prompts * r.best_of, limits.max_choices));
  if (chat) {
    if (boolean(body, "logprobs", false)) r.logprobs = integer(body, "top_logprobs", 0, 0, limits.max_logprobs);
    else if (given(body, "top_logprobs")) bad("top_logprobs", "`top_logprobs` needs `logprobs: true`");
  } else if (given(body, "logprobs")) {
    if (body["logprobs"].is_boolean())
      bad("logprobs", "`logprobs` of /v1/completions is the number of alternatives per token (an integer), not a "
                      "boolean");
    r.logprobs = integer(body, "logprobs", -1, 0, limits.max_logprobs);
  }
  if (given(body, "stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 64) bad("stop", fmt::format("`stop` has {} strings; at most 64", s.size()));
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
  if (given(body, "stop_token_ids")) {
    if (!body["stop_token_ids"].is_array()) bad("stop_token_ids", "`stop_token_ids` must be an array of token ids");
    r.stop_token_ids = token_ids(body["stop_token_ids"], "stop_token_ids");
  }
  r.ignore_eos = boolean(body, "ignore_eos", false);
  parse_response_format(body, r);
  r.stream = boolean(body, "stream", false);
  if (r.stream && r.best_of > r.n)
    bad("best_of", "`best_of` greater than `n` cannot stream: the best choices are known only at the end");
  if (given(body, "stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) bad("stream_options", "`stream_options` must be an object");
    if (!r.stream) bad("stream_options", "`stream_options` is only allowed with `stream: true`");
    for (const auto& [k, v] : so.items())
      if (k != "include_usage" && !v.is_null())
        bad("stream_options." + k, fmt::format("`stream_options.{}` is not implemented (include_usage is)", k));
    r.include_usage = boolean(so, "include_usage", false);
  }
  return r;
}

// ---- rendering ----------------------------------------------------------------------------------

std::string logprob_token_text(const std::string& bytes) {
  size_t i = 0;
  bool valid = true;
  while (i < bytes.size() && valid) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > bytes.size()) {
      valid = false;
      break;
    }
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(bytes[i + k]) & 0xC0) != 0x80) valid = false;
    i += n;
  }
  if (valid) return bytes;
  std::string out = "bytes:";
  for (unsigned char b : bytes) out += fmt::format("\\x{:02x}", b);
  return out;
}

namespace {

json usage(int64_t prompt, int64_t completion) {
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}
json reason(const std::optional<std::string>& r) { return r ? json(*r) : json(nullptr); }
// Generated text may end inside a UTF-8 character (a byte-level tokenizer): never throw on it.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
// -inf has no JSON number: vLLM's floor.
json lp_value(float lp) {
  if (std::isnan(lp)) return nullptr;
  return std::isfinite(lp) ? static_cast<double>(lp) : -9999.0;
}
json byte_list(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// Completions' logprobs object over `lps`, offsets starting at `offset`. With k alternatives asked, the
// top dict holds them and the token itself (vLLM's shape, what lm-evaluation-harness reads).
json completion_logprobs(const std::vector<token_logprob>& lps, int64_t k, int64_t offset, const token_namer& names) {
  json tokens = json::array(), values = json::array(), tops = json::array(), offsets = json::array();
  for (const auto& t : lps) {
    const std::string bytes = names(t.id);
    const std::string text = logprob_token_text(bytes);
    tokens.push_back(text);
    values.push_back(lp_value(t.logprob));
    offsets.push_back(offset);
    offset += static_cast<int64_t>(bytes.size());  // where the next token's bytes start in the text
    if (std::isnan(t.logprob)) {
      tops.push_back(nullptr);
      continue;
    }
    json top = json::object();
    for (size_t i = 0; i < t.top.size() && static_cast<int64_t>(i) < k; ++i)
      top[logprob_token_text(names(t.top[i].first))] = lp_value(t.top[i].second);
    top[text] = lp_value(t.logprob);
    tops.push_back(top);
  }
  return {{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json chat_logprobs(const std::vector<token_logprob>& lps, int64_t k, const token_namer& names) {
  json content = json::array();
  for (const auto& t : lps) {
    const std::string b = names(t.id);
    json top = json::array();
    for (size_t i = 0; i < t.top.size() && static_cast<int64_t>(i) < k; ++i) {
      const std::string tb = names(t.top[i].first);
      top.push_back({{"token", logprob_token_text(tb)}, {"logprob", lp_value(t.top[i].second)}, {"bytes", byte_list(tb)}});
    }
    content.push_back(
        {{"token", logprob_token_text(b)}, {"logprob", lp_value(t.logprob)}, {"bytes", byte_list(b)}, {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

}  // namespace

std::string completion_response_json(const completion_result& r, const completion_request& q, const token_namer& names) {
  json j{{"id", r.id}, {"created", r.created}, {"model", r.model}, {"usage", usage(r.prompt_tokens, r.completion_tokens)}};
  json choices = json::array();
  for (const auto& c : r.choices) {
    json lp = nullptr;
    if (q.logprobs >= 0) lp = q.chat ? chat_logprobs(c.logprobs, q.logprobs, names)
                                     : completion_logprobs(c.logprobs, q.logprobs, 0, names);
    if (q.chat)
      choices.push_back({{"index", c.index},
                         {"message", {{"role", "assistant"}, {"content", c.text}, {"refusal", nullptr}}},
                         {"logprobs", lp},
                         {"finish_reason", c.finish_reason}});
    else
      choices.push_back({{"index", c.index}, {"text", c.text}, {"logprobs", lp}, {"finish_reason", c.finish_reason}});
  }
  j["object"] = q.chat ? "chat.completion" : "text_completion";
  j["choices"] = choices;
  return dump(j);
}

std::string chunk_json(const stream_head& h, const completion_request& q, const choice_delta& d, bool first,
                       const token_namer& names) {
  json j{{"id", h.id}, {"created", h.created}, {"model", h.model}};
  json lp = nullptr;
  if (q.logprobs >= 0 && !d.logprobs.empty())
    lp = q.chat ? chat_logprobs(d.logprobs, q.logprobs, names)
                : completion_logprobs(d.logprobs, q.logprobs, d.text_offset, names);
  if (q.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!d.text.empty() || !d.finish_reason) delta["content"] = d.text;
    j["object"] = "chat.completion.chunk";
    j["choices"] =
        json::array({{{"index", d.index}, {"delta", delta}, {"logprobs", lp}, {"finish_reason", reason(d.finish_reason)}}});
  } else {
    j["object"] = "text_completion";
    j["choices"] =
        json::array({{{"index", d.index}, {"text", d.text}, {"logprobs", lp}, {"finish_reason", reason(d.finish_reason)}}});
  }
  return dump(j);
}

std::string usage_chunk_json(const stream_head& h, bool chat, int64_t prompt_tokens, int64_t completion_tokens) {
  json j{{"id", h.id},
         {"object", chat ? "chat.completion.chunk" : "text_completion"},
         {"created", h.created},
         {"model", h.model},
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
