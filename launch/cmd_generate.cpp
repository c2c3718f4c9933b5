// `troupe generate MODEL_DIR --prompt-ids 1,2,3 | --prompt TEXT --max-new-tokens N [--threads T]`:
// greedy decoding with a KV cache; prints the new token ids on one line (comma
// separated) and the throughput on stderr.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "parallel/data/byte_tokenizer.h"
#include "parallel/model/generate.h"
#include "runtime/threads.h"

namespace troupe::launch {

namespace {

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    const std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TROUPE_CHECK(used == item.size() && !item.empty() && v >= 0 && v <= INT32_MAX, runtime::errc::invalid_argument,
                 "--prompt-ids: \"{}\" (item {}) is not a non-negative integer; write ids like 1,2,3", item,
                 ids.size() + 1);
    ids.push_back(static_cast<int32_t>(v));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

}  // namespace

void register_generate(CLI::App& app) {
  struct opts {
    std::string dir, prompt, text;
    int64_t max_new_tokens = 16;
    int threads = 0;
    int64_t eos = -1;
  };
  auto o = std::make_shared<opts>();
  auto* cmd = app.add_subcommand("generate", "Greedy generation with a KV cache from token ids");
  cmd->add_option("MODEL_DIR", o->dir, "Checkpoint directory (config.json + safetensors)")->required();
  auto* ids_opt = cmd->add_option("--prompt-ids", o->prompt, "Prompt token ids, comma separated (e.g. 1,2,3)");
  auto* text_opt = cmd->add_option("--prompt", o->text,
                                   "Prompt text for a byte-level model (troupe train on text): prints text back");
  ids_opt->excludes(text_opt);
  text_opt->excludes(ids_opt);
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--threads", o->threads, "CPU threads (0 = TROUPE_NUM_THREADS or all cores)");
  cmd->add_option("--eos-id", o->eos, "Stop when this token is generated (default: never)");
  cmd->callback([o] {
    TROUPE_CHECK(o->max_new_tokens > 0, runtime::errc::invalid_argument, "--max-new-tokens {} must be > 0",
                 o->max_new_tokens);
    TROUPE_CHECK(o->threads >= 0, runtime::errc::invalid_argument, "--threads {} must be >= 0", o->threads);
    if (o->threads > 0) runtime::set_num_threads(o->threads);
    TROUPE_CHECK(!o->prompt.empty() || !o->text.empty(), runtime::errc::invalid_argument,
                 "give --prompt-ids 1,2,3 or --prompt TEXT");
    std::vector<int32_t> prompt;
    if (!o->text.empty()) {
      for (uint16_t t : parallel::byte_encode(o->text)) prompt.push_back(t);
    } else {
      prompt = parse_ids(o->prompt);
    }
    const parallel::model_weights w = parallel::model_weights::load(o->dir);
    const parallel::decoder dec(w);
    parallel::generate_options g;
    g.max_new_tokens = o->max_new_tokens;
    g.eos_token_id = o->eos;
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = parallel::generate_greedy(dec, prompt, 1, static_cast<int64_t>(prompt.size()), g);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::vector<int32_t> fresh(r.ids.begin() + r.prompt_tokens, r.ids.end());
    if (!o->text.empty()) {
      TROUPE_CHECK(w.config().vocab_size >= parallel::byte_vocab_size, runtime::errc::invalid_argument,
                   "--prompt: {} has a vocabulary of {}, not byte-level ({}); use --prompt-ids", o->dir,
                   w.config().vocab_size, parallel::byte_vocab_size);
      fmt::print("{}{}\n", o->text, parallel::byte_decode(std::span<const int32_t>(fresh)));
    } else {
      fmt::print("{}\n", fmt::join(fresh, ","));
    }
    fmt::print(stderr, "generated {} tokens after a {}-token prompt in {:.3f} s: {:.1f} tokens/s ({} threads)\n",
               r.new_tokens, r.prompt_tokens, s, s > 0 ? static_cast<double>(r.new_tokens) / s : 0.0,
               runtime::num_threads());
  });
}

}  // namespace troupe::launch
