// tests/unit/engine_harness.h — the serving engine on a fixture model, stepped by the test: every
// event of every request collected (ids, text, logprobs, per sample), and generate_greedy as the
// reference.
//
//   harness h("llama_gqa", {.block_size = 4, .num_blocks = 64});
//   h.submit("a", prompt_of(9, 7, V), greedy_params(10));
//   h.run();                                    // steps until every request finished
//   EXPECT_EQ(h.out["a"].ids, h.greedy(prompt, 10));
#pragma once
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <string>
#include <vector>

#include "elastic/engine/engine.h"
#include "parallel/model/generate.h"
#include "parallel/model/model_weights.h"

namespace troupe_test {

using namespace troupe;
using namespace troupe::elastic;

struct collected {
  std::vector<int32_t> ids;
  std::string text, reason, error;
  int events = 0, finished = 0;
  int64_t completion_tokens = 0;
  std::vector<token_logprob> logprobs, prompt_logprobs;
  double cumulative_logprob = 0;
};

struct harness {
  parallel::model_weights w;
  std::unique_ptr<parallel::decoder> dec;
  std::unique_ptr<parallel::text_tokenizer> tok;
  std::unique_ptr<engine> eng;
  std::map<std::string, collected> out;
  std::mutex mu;

  // t: the tokenizer (null: the fixture's own).
  harness(const std::string& fixture, engine_options o, std::unique_ptr<parallel::text_tokenizer> t = nullptr) {
    const std::string dir = std::string(TROUPE_FIXTURES_DIR) + "/" + fixture;
    w = parallel::model_weights::load(dir);
    dec = std::make_unique<parallel::decoder>(w);
    tok = t ? std::move(t) : parallel::load_tokenizer(dir);
    eng = std::make_unique<engine>(*dec, *tok, o);
  }
  // Request `id` of n samples: sample i's events go to out[id] (n = 1) or out[id + "#" + i].
  void submit(const std::string& id, std::vector<int32_t> prompt, sampling_params p, int64_t n = 1,
              bool cumulative = false) {
    engine_request r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.params = p;
    r.n = n;
    r.cumulative_logprob = cumulative;
    for (int64_t i = 0; i < n; ++i) out[n == 1 ? id : id + "#" + std::to_string(i)];
    r.on_event = [this, id, n](const engine_event& e) {
      std::lock_guard<std::mutex> g(mu);
      auto& c = out[n == 1 ? id : id + "#" + std::to_string(e.index)];
      c.logprobs.insert(c.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
      c.prompt_logprobs.insert(c.prompt_logprobs.end(), e.prompt_logprobs.begin(), e.prompt_logprobs.end());
      c.cumulative_logprob = e.cumulative_logprob;
      c.ids.insert(c.ids.end(), e.token_ids.begin(), e.token_ids.end());
      c.text += e.text;
      ++c.events;
      if (e.finished) {
        ++c.finished;
        c.reason = e.finish_reason;
        c.error = e.error;
        c.completion_tokens = e.completion_tokens;
      }
    };
    eng->submit(std::move(r));
  }
  void run(int max_iterations = 10000) {
    for (int i = 0; i < max_iterations; ++i) {
      eng->step();
      bool all = true;
      std::lock_guard<std::mutex> g(mu);
      for (auto& [id, c] : out) all &= c.finished == 1;
      if (all && eng->stats().running == 0 && eng->stats().waiting == 0) return;
    }
    FAIL() << "the engine did not finish";
  }
  std::vector<int32_t> greedy(const std::vector<int32_t>& prompt, int64_t n) const {
    parallel::generate_options o;
    o.max_new_tokens = n;
    const auto r = parallel::generate_greedy(*dec, prompt, 1, static_cast<int64_t>(prompt.size()), o);
    return std::vector<int32_t>(r.ids.begin() + static_cast<int64_t>(prompt.size()), r.ids.end());
  }
};

// The byte tokenizer behind text_tokenizer, for tests that change some of its answers.
class byte_tokenizer_base : public parallel::text_tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view t, bool s) const override { return b_.encode(t, s); }
  std::string decode(std::span<const int32_t> ids, bool s) const override { return b_.decode(ids, s); }
  std::string token_bytes(int32_t id, bool s) const override { return b_.token_bytes(id, s); }
  bool is_special(int32_t id) const override { return b_.is_special(id); }
  int64_t vocab_size() const override { return b_.vocab_size(); }
  std::optional<int32_t> bos_id() const override { return b_.bos_id(); }
  const std::vector<int32_t>& eos_ids() const override { return b_.eos_ids(); }
  std::optional<int32_t> token_to_id(std::string_view t) const override { return b_.token_to_id(t); }
  std::string id_to_token(int32_t id) const override { return b_.id_to_token(id); }
  const std::string& chat_template_source() const override { return b_.chat_template_source(); }
  const std::string& bos_token() const override { return b_.bos_token(); }
  const std::string& eos_token() const override { return b_.eos_token(); }

 protected:
  parallel::byte_text_tokenizer b_;
};

inline std::vector<int32_t> prompt_of(int64_t n, int32_t seed, int64_t vocab) {
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((seed * 31 + i * 7 + i * i) % vocab));
  return p;
}

inline sampling_params greedy_params(int64_t n) {
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = n;
  p.ignore_eos = true;
  return p;
}

}  // namespace troupe_test
