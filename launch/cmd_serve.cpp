// `troupe serve serve.yaml [--set key=value ...]`: loads the HF checkpoint, starts the serving
// engine (continuous batching, paged KV cache with prefix caching) and the OpenAI-compatible
// HTTP server (127.0.0.1 by default) in this process, and serves until SIGINT / SIGTERM.
//
//   troupe serve examples/serve_moe/serve.yaml --set server.port=0    # prints the bound port
#include <fmt/format.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "elastic/engine/engine.h"
#include "elastic/server/engine_backend.h"
#include "elastic/server/http_server.h"
#include "launch/commands.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/serve_spec.h"
#include "runtime/threads.h"

namespace troupe::launch {

namespace {

using runtime::errc;

// A quarter of MemAvailable (/proc/meminfo), at most 4 GiB: the KV cache when none is given.
size_t auto_kv_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kib = 0, avail = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") avail = kib * 1024;
  if (avail == 0) avail = size_t{1} << 30;
  return std::min(avail / 4, size_t{4} << 30);
}

int serve(const std::string& path, const std::vector<std::string>& sets, int threads) {
  const serve::ServeSpec spec = runtime::load_serve_spec(path, sets);
  TROUPE_CHECK(spec.engine().ranks() == 1, errc::unsupported,
               "{}: engine.ranks = {}: serving across expert-parallel worker ranks is not built yet (issue #8); "
               "use engine.ranks: 1",
               path, spec.engine().ranks());
  if (threads > 0) runtime::set_num_threads(threads);
  parallel::model_weights w = parallel::model_weights::load(spec.model());
  parallel::decoder dec(w);
  std::unique_ptr<parallel::text_tokenizer> tok =
      parallel::load_tokenizer(spec.tokenizer().empty() ? spec.model() : spec.tokenizer());
  elastic::engine_options eo;
  eo.block_size = spec.engine().block_size();
  const int64_t kv = runtime::serve_kv_cache_bytes(spec);
  eo.kv_cache_bytes = kv > 0 ? static_cast<size_t>(kv) : auto_kv_bytes();
  eo.max_batch_tokens = spec.engine().max_batch_tokens();
  eo.max_running = spec.engine().max_running();
  eo.max_waiting = spec.engine().max_waiting();
  eo.prefix_caching = spec.engine().prefix_caching();
  eo.static_batching = spec.engine().batching() == "static";
  elastic::engine eng(dec, *tok, eo);
  const std::string name = spec.served_model_name().empty()
                               ? std::filesystem::path(spec.model()).lexically_normal().filename().string()
                               : spec.served_model_name();
  elastic::engine_backend backend(eng, *tok, name.empty() ? "model" : name, static_cast<uint64_t>(spec.seed()));
  elastic::http_options ho;
  ho.host = spec.server().host();
  ho.port = static_cast<int>(spec.server().port());
  ho.api_key = runtime::serve_api_key(spec);
  ho.threads = static_cast<int>(spec.server().threads());
  ho.limits.max_body_bytes = static_cast<size_t>(runtime::serve_max_body_bytes(spec));
  ho.limits.max_tokens = spec.server().max_tokens();
  ho.limits.max_prompt_tokens = spec.server().max_prompt_tokens() > 0 ? spec.server().max_prompt_tokens()
                                                                      : w.config().max_position_embeddings - 1;
  elastic::http_server server(backend, ho);

  // SIGINT / SIGTERM end the server: blocked here (inherited by every thread), waited for below.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  eng.start();
  server.start();
  fmt::print("troupe serve: {} ({}, {} parameters) on http://{}:{} — {} KV blocks of {} tokens, {} batching{}\n",
             name, runtime::model_family_name(w.config().family), w.parameter_count(), ho.host, server.port(),
             eng.num_blocks(), eo.block_size, eo.static_batching ? "static" : "continuous",
             ho.api_key.empty() ? "" : ", API key required");
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  runtime::log::info("serve: signal {}: stopping", sig);
  server.stop();
  eng.stop();
  const auto st = eng.stats();
  fmt::print("troupe serve: stopped; {} requests finished, {} aborted, {} tokens generated, prefix hit rate {:.3f}\n",
             st.finished, st.aborted, st.generated_tokens, st.kv.hit_rate());
  return 0;
}

}  // namespace

void register_serve(CLI::App& app) {
  struct opts {
    std::string spec;
    std::vector<std::string> sets;
    int threads = 0;
  };
  auto o = std::make_shared<opts>();
  auto* cmd = app.add_subcommand("serve", "serve a model over an OpenAI-compatible HTTP API (serve.yaml)");
  cmd->add_option("spec", o->spec, "the serve spec (YAML; see examples/serve_moe/serve.yaml)")->required();
  cmd->add_option("--set", o->sets, "override a key: --set server.port=0 (repeatable)");
  cmd->add_option("--threads", o->threads, "CPU threads (0 = TROUPE_NUM_THREADS or all cores)");
  cmd->callback([o] {
    const int code = serve(o->spec, o->sets, o->threads);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace troupe::launch
