// elastic/server/engine_backend.h — the HTTP server's generation_backend over the serving engine:
// prompts through the tokenizer (chat: the model's chat template), OpenAI fields to sampling
// parameters (penalties, logit bias, logprobs, response_format as a compiled JSON grammar), engine
// events to HTTP events.
//
//   engine eng(dec, *tok, opts);  eng.start();
//   engine_backend be(eng, *tok, "tiny-moe", /*default_seed=*/0);
//   http_server srv(be, http_opts);  srv.start();
//
// Invariants:
//   1. A completions prompt given as text is encoded with the tokenizer's special tokens (BOS,
//      when the model's vocabulary has that id);
//      a chat prompt is the chat template's rendering, encoded without adding them again; a prompt
//      of token ids is taken as is, each id checked against the vocabulary (400, param "prompt").
//   2. A request without a seed gets default_seed + a per-request counter when default_seed > 0,
//      else a random one; sample i of a submission uses seed + i; temperature 0 is greedy.
//   3. engine_busy becomes 503 "server_error" ("the server is full"); the engine's refusals of
//      input (errc::invalid_argument) become 400 with its message; a JSON schema the guided
//      decoder cannot take is 400 naming its place (param response_format.json_schema.schema...).
//   4. Submitting never waits on the engine's iteration: the sink's submit_async answers later.
#pragma once
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "elastic/engine/engine.h"
#include "elastic/server/http_server.h"
#include "parallel/data/chat_template.h"

namespace troupe::elastic {

class engine_backend final : public generation_backend {
 public:
  // sink: where requests go (the scheduler actor, actors/serve_scheduler.h); null = the engine itself.
  engine_backend(engine& eng, const parallel::text_tokenizer& tok, std::string model_id, uint64_t default_seed,
                 request_sink* sink = nullptr);
  std::string model_id() const override { return model_id_; }
  std::vector<int32_t> prompt_tokens(const completion_request& r, size_t i) override;
  std::string prompt_text(const completion_request& r, size_t i) override;
  std::string token_bytes(int32_t id) const override;
  void submit(generation_submission s) override;
  void abort(const std::string& id) override { sink_->abort(id); }
  std::string metrics_text() override { return metrics_ ? metrics_() : eng_.metrics_text(); }
  // What /metrics shows instead of the engine's own (a data-parallel group's leader: every rank).
  void set_metrics(std::function<std::string()> f) { metrics_ = std::move(f); }

 private:
  engine& eng_;
  request_sink* sink_;
  const parallel::text_tokenizer& tok_;
  parallel::chat_template template_;
  std::string model_id_;
  uint64_t default_seed_;
  std::atomic<uint64_t> counter_{0};
  std::function<std::string()> metrics_;
  std::mutex grammar_mu_;
  std::map<std::string, std::shared_ptr<const json_grammar>> grammars_;  // compiled schemas (the last 64)
};

}  // namespace troupe::elastic
