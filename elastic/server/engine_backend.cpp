// elastic/server/engine_backend.cpp — see engine_backend.h.
#include "elastic/server/engine_backend.h"

#include <fmt/format.h>

#include <random>

#include "runtime/error.h"

namespace troupe::elastic {

engine_backend::engine_backend(engine& eng, const parallel::text_tokenizer& tok, std::string model_id,
                               uint64_t default_seed, request_sink* sink)
    : eng_(eng), sink_(sink ? sink : &eng), tok_(tok), template_(parallel::chat_template::from_tokenizer(tok)),
      model_id_(std::move(model_id)), default_seed_(default_seed) {}

std::vector<int32_t> engine_backend::prompt_tokens(const completion_request& r) {
  if (r.chat) {
    std::vector<parallel::chat_message> m;
    for (const auto& x : r.messages) m.push_back({x.role, x.content});
    return tok_.encode(template_.render(m, /*add_generation_prompt=*/true), /*add_special=*/false);
  }
  if (!r.prompt_is_ids) {
    // BOS only when the model has that id (a byte-level model of 256 ids has no BOS).
    const auto bos = tok_.bos_id();
    return tok_.encode(r.prompt, /*add_special=*/bos && *bos < eng_.vocab_size());
  }
  const int64_t V = eng_.vocab_size();
  for (size_t i = 0; i < r.prompt_ids.size(); ++i)
    if (r.prompt_ids[i] >= V)
      throw api_error(400, "invalid_request_error",
                      fmt::format("`prompt[{}]` = {} is not a token id of this model (vocabulary {})", i,
                                  r.prompt_ids[i], V),
                      "prompt");
  return r.prompt_ids;
}

void engine_backend::submit(const std::string& id, const completion_request& r, std::vector<int32_t> prompt,
                            generation_callback on_event) {
  engine_request q;
  q.id = id;
  q.prompt = std::move(prompt);
  q.params.temperature = r.temperature;
  q.params.top_k = r.top_k;
  q.params.top_p = r.top_p;
  q.params.max_tokens = r.max_tokens;
  q.params.stop = r.stop;
  q.params.stop_token_ids = r.stop_token_ids;
  q.params.ignore_eos = r.ignore_eos;
  if (r.seed) q.params.seed = *r.seed;
  else if (default_seed_ > 0) q.params.seed = default_seed_ + counter_++;
  else q.params.seed = std::random_device{}();
  q.on_event = [cb = std::move(on_event)](const engine_event& e) {
    cb({e.text, e.token_ids, e.finished, e.finish_reason, e.error, e.prompt_tokens, e.completion_tokens});
  };
  try {
    sink_->submit(std::move(q));
  } catch (const engine_busy& e) {
    throw api_error(503, "server_error", fmt::format("the server is full: {}; retry later", e.what()));
  } catch (const runtime::error& e) {
    if (e.code() != runtime::errc::invalid_argument) throw;
    throw api_error(400, "invalid_request_error", e.message());
  }
}

}  // namespace troupe::elastic
