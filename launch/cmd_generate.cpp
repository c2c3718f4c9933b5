// `troupe generate MODEL_DIR --prompt-ids 1,2,3 | --prompt TEXT --max-new-tokens N [--threads T]
//   [--temperature T --top-p P --top-k K --seed S]`: decoding with a KV cache; prints the new token
// ids on one line (comma separated), or the text for --prompt, and the throughput on stderr.
//
// Temperature 0 (the default) is greedy decoding (parallel::generate_greedy). Otherwise the tokens
// are sampled by the serving engine on this thread (elastic/engine/engine.h, one request), so a seed
// gives the same tokens as `troupe serve` with that seed and the same sampling parameters.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "elastic/engine/engine.h"
#include "launch/commands.h"
#include "parallel/data/bpe_tokenizer.h"
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

struct sampled {
  std::vector<int32_t> ids;
  std::string finish;
};

// One sampled request through the engine, stepped on this thread.
sampled sample_with_engine(const parallel::decoder& dec, const std::string& dir, const std::vector<int32_t>& prompt,
                           const elastic::sampling_params& p) {
  const auto tok = parallel::load_tokenizer(dir);
  elastic::engine_options eo;
  eo.block_size = 16;
  eo.num_blocks = (static_cast<int64_t>(prompt.size()) + p.max_tokens + 1 + eo.block_size - 1) / eo.block_size + 1;
  eo.max_batch_tokens = std::max<int64_t>(512, static_cast<int64_t>(prompt.size()));
  elastic::engine eng(dec, *tok, eo);
  sampled out;
  elastic::engine_request r;
  r.id = "generate";
  r.prompt = prompt;
  r.params = p;
  r.on_event = [&out](const elastic::engine_event& e) {
    out.ids.insert(out.ids.end(), e.token_ids.begin(), e.token_ids.end());
    if (e.finished) out.finish = e.finish_reason.empty() ? "?" : e.finish_reason;
  };
  eng.submit(std::move(r));
  while (out.finish.empty()) eng.step();
  return out;
}

}  // namespace

void register_generate(CLI::App& app) {
  struct opts {
    std::string dir, prompt, text;
    int64_t max_new_tokens = 16;
    int threads = 0;
    int64_t eos = -1;
    double temperature = 0, top_p = 1;
    int64_t top_k = 0;
    std::optional<uint64_t> seed;
  };
  auto o = std::make_shared<opts>();
  auto* cmd = app.add_subcommand("generate", "Generate with a KV cache (greedy, or sampled with --temperature)");
  cmd->add_option("MODEL_DIR", o->dir, "Checkpoint directory (config.json + safetensors)")->required();
  auto* ids_opt = cmd->add_option("--prompt-ids", o->prompt, "Prompt token ids, comma separated (e.g. 1,2,3)");
  auto* text_opt = cmd->add_option("--prompt", o->text,
                                   "Prompt text for a byte-level model (troupe train on text): prints text back");
  ids_opt->excludes(text_opt);
  text_opt->excludes(ids_opt);
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--threads", o->threads, "CPU threads (0 = TROUPE_NUM_THREADS or all cores)");
  cmd->add_option("--eos-id", o->eos, "Stop when this token is generated (default: never)");
  cmd->add_option("--temperature", o->temperature, "0 = greedy (the default); (0, 2] samples")->capture_default_str();
  cmd->add_option("--top-p", o->top_p, "Nucleus sampling: keep the most likely tokens up to this mass (0, 1]")
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "Keep the k most likely tokens (0 = all)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Sampling seed (default: a random one, printed on stderr)");
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
    const bool sample = o->temperature > 0;
    std::vector<int32_t> fresh;
    std::string how = "greedy";
    const auto t0 = std::chrono::steady_clock::now();
    if (!sample) {
      parallel::generate_options g;
      g.max_new_tokens = o->max_new_tokens;
      g.eos_token_id = o->eos;
      const auto r = parallel::generate_greedy(dec, prompt, 1, static_cast<int64_t>(prompt.size()), g);
      fresh.assign(r.ids.begin() + r.prompt_tokens, r.ids.end());
    } else {
      elastic::sampling_params p;
      p.temperature = o->temperature;
      p.top_p = o->top_p;
      p.top_k = o->top_k;
      p.seed = o->seed ? *o->seed : std::random_device{}();
      p.max_tokens = o->max_new_tokens;
      p.ignore_eos = true;  // as the greedy path: only --eos-id stops early
      if (o->eos >= 0) p.stop_token_ids = {static_cast<int32_t>(o->eos)};
      if (auto bad = elastic::check_sampling_params(p)) {
        std::string flag = bad->param;  // top_p -> --top-p
        std::replace(flag.begin(), flag.end(), '_', '-');
        TROUPE_THROW(runtime::errc::invalid_argument, "--{}: {}", flag, bad->message);
      }
      fresh = sample_with_engine(dec, o->dir, prompt, p).ids;
      how = fmt::format("sampled: temperature {}, top-p {}, top-k {}, seed {}", p.temperature, p.top_p, p.top_k,
                        p.seed);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!o->text.empty()) {
      TROUPE_CHECK(w.config().vocab_size >= parallel::byte_vocab_size, runtime::errc::invalid_argument,
                   "--prompt: {} has a vocabulary of {}, not byte-level ({}); use --prompt-ids", o->dir,
                   w.config().vocab_size, parallel::byte_vocab_size);
      fmt::print("{}{}\n", o->text, parallel::byte_decode(std::span<const int32_t>(fresh)));
    } else {
      fmt::print("{}\n", fmt::join(fresh, ","));
    }
    fmt::print(stderr, "generated {} tokens after a {}-token prompt in {:.3f} s: {:.1f} tokens/s ({} threads; {})\n",
               fresh.size(), prompt.size(), s, s > 0 ? static_cast<double>(fresh.size()) / s : 0.0,
               runtime::num_threads(), how);
  });
}

}  // namespace troupe::launch
