// elastic/server/engine_backend.cpp — see engine_backend.h.
#include "elastic/server/engine_backend.h"

#include <fmt/format.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <random>

#include "elastic/engine/guided_json.h"
#include "runtime/error.h"

namespace troupe::elastic {

engine_backend::engine_backend(engine& eng, const parallel::text_tokenizer& tok, std::string model_id,
                               uint64_t default_seed, request_sink* sink)
    : eng_(eng), sink_(sink ? sink : &eng), tok_(tok), template_(parallel::chat_template::from_tokenizer(tok)),
      model_id_(std::move(model_id)), default_seed_(default_seed) {}

std::vector<int32_t> engine_backend::prompt_tokens(const completion_request& r, size_t i) {
  if (r.chat) {
    std::vector<parallel::chat_message> m;
    for (const auto& x : r.messages) m.push_back({x.role, x.content});
    return tok_.encode(template_.render(m, r.add_generation_prompt), /*add_special=*/false);
  }
  const prompt_input& p = r.prompts.at(i);
  if (!p.is_ids) {
    // BOS only when the model has that id (a byte-level model of 256 ids has no BOS).
    const auto bos = tok_.bos_id();
    return tok_.encode(p.text, /*add_special=*/r.add_special_tokens && bos && *bos < eng_.vocab_size());
  }
  const int64_t V = eng_.vocab_size();
  const std::string param = r.prompts.size() > 1 ? fmt::format("prompt[{}]", i) : "prompt";
  for (size_t k = 0; k < p.ids.size(); ++k)
    if (p.ids[k] >= V)
      throw api_error(400, "invalid_request_error",
                      fmt::format("`{}[{}]` = {} is not a token id of this model (vocabulary {})", param, k, p.ids[k], V),
                      param);
  return p.ids;
}

std::string engine_backend::prompt_text(const completion_request& r, size_t i) {
  if (r.chat) return {};
  const prompt_input& p = r.prompts.at(i);
  return p.is_ids ? tok_.decode(p.ids) : p.text;
}

std::string engine_backend::token_bytes(int32_t id) const {
  if (id < 0 || id >= tok_.vocab_size()) return {};
  return tok_.token_bytes(id, /*skip_special=*/false);
}

namespace {

// response_format -> the compiled grammar (null for text); schema errors are 400s naming the place.
std::shared_ptr<const json_grammar> compile_format(const completion_request& r) {
  if (r.response_format == "json_object") return json_grammar::any_object();
  if (r.response_format != "json_schema") return nullptr;
  const std::string base = "response_format.json_schema.schema";
  try {
    return json_grammar::from_schema(nlohmann::json::parse(r.json_schema));
  } catch (const guided_error& e) {
    const std::string param = e.path.empty() ? base : base + "." + e.path;
    throw api_error(400, "invalid_request_error", fmt::format("`{}`: {}", param, e.what()), param);
  }
}

}  // namespace

void engine_backend::submit(generation_submission s) {
  const completion_request& r = *s.request;
  engine_request q;
  q.arrival = std::chrono::steady_clock::now();  // TTFT includes the wait for the scheduler
  q.id = s.id;
  q.prompt = std::move(s.prompt);
  q.n = s.samples;
  q.cumulative_logprob = s.cumulative_logprob;
  sampling_params& p = q.params;
  p.temperature = r.temperature;
  p.top_k = r.top_k;
  p.top_p = r.top_p;
  p.min_p = r.min_p;
  p.max_tokens = r.max_tokens;
  p.min_tokens = r.min_tokens;
  p.stop = r.stop;
  p.stop_token_ids = r.stop_token_ids;
  p.ignore_eos = r.ignore_eos;
  p.presence_penalty = r.presence_penalty;
  p.frequency_penalty = r.frequency_penalty;
  p.repetition_penalty = r.repetition_penalty;
  for (const auto& [id, b] : r.logit_bias) p.logit_bias.emplace_back(id, static_cast<float>(b));
  p.logprobs = r.logprobs;
  // The prompt's logprobs for echo; echo alone with max_tokens 0 still runs the prompt once.
  if (s.prompt_logprobs || r.max_tokens == 0) p.prompt_logprobs = std::max<int64_t>(r.logprobs, 0);
  if (r.seed) p.seed = *r.seed;
  else if (default_seed_ > 0) p.seed = default_seed_ + counter_.fetch_add(static_cast<uint64_t>(s.samples));
  else p.seed = std::random_device{}();
  try {
    if (!r.json_schema.empty() || r.response_format == "json_object") {
      std::lock_guard<std::mutex> g(grammar_mu_);
      const std::string key = r.response_format + ":" + r.json_schema;
      auto it = grammars_.find(key);
      if (it == grammars_.end()) {
        if (grammars_.size() >= 64) grammars_.clear();
        it = grammars_.emplace(key, compile_format(r)).first;
      }
      p.grammar = it->second;
      p.grammar_source = r.response_format == "json_object" ? "json_object" : "json_schema:" + r.json_schema;
    }
  } catch (...) {
    s.on_accepted(std::current_exception());
    return;
  }
  q.on_event = [cb = std::move(s.on_event)](const engine_event& e) {
    generation_event g;
    g.index = e.index;
    g.text = e.text;
    g.token_ids = e.token_ids;
    g.logprobs = e.logprobs;
    g.prompt_logprobs = e.prompt_logprobs;
    g.finished = e.finished;
    g.finish_reason = e.finish_reason;
    g.error = e.error;
    g.prompt_tokens = e.prompt_tokens;
    g.completion_tokens = e.completion_tokens;
    g.cumulative_logprob = e.cumulative_logprob;
    cb(g);
  };
  sink_->submit_async(std::move(q), [accepted = std::move(s.on_accepted)](std::exception_ptr err) {
    if (!err) return accepted(nullptr);
    try {
      std::rethrow_exception(err);
    } catch (const engine_busy& e) {
      accepted(std::make_exception_ptr(
          api_error(503, "server_error", fmt::format("the server is full: {}; retry later", e.what()))));
    } catch (const runtime::error& e) {
      if (e.code() != runtime::errc::invalid_argument) return accepted(err);
      accepted(std::make_exception_ptr(api_error(400, "invalid_request_error", e.message())));
    } catch (...) {
      accepted(err);
    }
  });
}

}  // namespace troupe::elastic
