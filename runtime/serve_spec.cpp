// runtime/serve_spec.cpp — see serve_spec.h.
#include "runtime/serve_spec.h"

#include <fmt/format.h>

#include <cstdlib>

#include "runtime/error.h"
#include "runtime/job_spec.h"

namespace troupe::runtime {

serve::ServeSpec serve_spec_defaults() {
  serve::ServeSpec s;
  auto* v = s.mutable_server();
  v->set_host("127.0.0.1");
  v->set_port(8000);
  v->set_max_body("1MiB");
  v->set_max_tokens(1024);
  v->set_threads(1);
  v->set_max_connections(16384);
  v->set_idle_timeout_ms(75000);
  auto* e = s.mutable_engine();
  e->set_ranks(1);
  e->set_block_size(16);
  e->set_max_batch_tokens(512);
  e->set_max_running(64);
  e->set_prefix_caching(true);
  e->set_batching("continuous");
  e->set_max_waiting(1024);
  e->set_attention("data_parallel");
  e->set_dispatch("least_kv_prefix");
  e->set_weight_memory("shared");
  auto* a = e->mutable_autoscale();
  a->set_ttft_slo_ms(2000);
  a->set_queue_per_rank(4);
  a->set_shrink_below(0.25);
  a->set_interval_ms(1000);
  a->set_patience(3);
  a->set_cooldown_ms(30000);
  expert_parallel_defaults(*s.mutable_expert());  // as parallel.expert of a job
  s.set_seed(0);
  return s;
}

namespace {

void validate_serve(serve::ServeSpec& s, const spec_fail& fail) {
  if (s.model().empty()) fail("model", "is required: a HF checkpoint directory (config.json + *.safetensors)");
  const auto& v = s.server();
  if (v.port() < 0 || v.port() > 65535) fail("server.port", fmt::format("= {} must be in [0, 65535]", v.port()));
  if (v.host().empty()) fail("server.host", "is empty; 127.0.0.1 serves this machine only");
  int64_t body = 0;
  try {
    body = parse_byte_size(v.max_body(), "server.max_body");
  } catch (const error& e) {
    fail("server.max_body", e.message());
  }
  if (body < 1024) fail("server.max_body", fmt::format("= {} must be at least 1KiB", v.max_body()));
  if (v.max_tokens() < 1) fail("server.max_tokens", fmt::format("= {} must be >= 1", v.max_tokens()));
  if (v.max_prompt_tokens() < 0) fail("server.max_prompt_tokens", "must be >= 0 (0 = the model's context)");
  if (v.threads() < 1) fail("server.threads", fmt::format("= {} must be >= 1", v.threads()));
  if (v.max_connections() < 1)
    fail("server.max_connections", fmt::format("= {} must be >= 1", v.max_connections()));
  if (v.idle_timeout_ms() < 1) fail("server.idle_timeout_ms", fmt::format("= {} must be >= 1", v.idle_timeout_ms()));
  const auto& e = s.engine();
  for (const auto& [key, value] : {std::pair<const char*, int64_t>{"engine.ranks", e.ranks()},
                                   {"engine.block_size", e.block_size()},
                                   {"engine.max_batch_tokens", e.max_batch_tokens()},
                                   {"engine.max_running", e.max_running()},
                                   {"engine.max_waiting", e.max_waiting()}})
    if (value < 1) fail(key, fmt::format("= {} must be >= 1", value));
  if (e.batching() != "continuous" && e.batching() != "static")
    fail("engine.batching", fmt::format("'{}' is not one of continuous, static", e.batching()));
  if (e.attention() != "data_parallel" && e.attention() != "replicated")
    fail("engine.attention", fmt::format("'{}' is not one of data_parallel, replicated", e.attention()));
  if (e.dispatch() != "least_kv_prefix" && e.dispatch() != "round_robin")
    fail("engine.dispatch", fmt::format("'{}' is not one of least_kv_prefix, round_robin", e.dispatch()));
  if (e.weight_memory() != "shared" && e.weight_memory() != "copy" && e.weight_memory() != "reallocate")
    fail("engine.weight_memory", fmt::format("'{}' is not one of shared, copy, reallocate", e.weight_memory()));
  const auto& a = e.autoscale();
  for (const auto& [key, value] : {std::pair<const char*, int64_t>{"engine.autoscale.ttft_slo_ms", a.ttft_slo_ms()},
                                   {"engine.autoscale.queue_per_rank", a.queue_per_rank()},
                                   {"engine.autoscale.interval_ms", a.interval_ms()},
                                   {"engine.autoscale.patience", a.patience()}})
    if (value < 1) fail(key, fmt::format("= {} must be >= 1", value));
  if (a.cooldown_ms() < 0) fail("engine.autoscale.cooldown_ms", fmt::format("= {} must be >= 0", a.cooldown_ms()));
  if (!(a.shrink_below() >= 0 && a.shrink_below() < 1))
    fail("engine.autoscale.shrink_below", fmt::format("= {} must be in [0, 1)", a.shrink_below()));
  if (!e.kv_cache_memory().empty()) {
    try {
      parse_byte_size(e.kv_cache_memory(), "engine.kv_cache_memory");
    } catch (const error& err) {
      fail("engine.kv_cache_memory", err.message());
    }
  }
  const auto& x = s.expert();
  if (x.mode() != "llep" && x.mode() != "ep" && x.mode() != "standard" && x.mode() != "eplb")
    fail("expert.mode", fmt::format("'{}' is not one of llep, ep, eplb", x.mode()));
  if (x.lambda() < 1) fail("expert.lambda", fmt::format("= {} must be >= 1", x.lambda()));
  if (x.alpha() <= 0) fail("expert.alpha", fmt::format("= {} must be > 0", x.alpha()));
  if (x.min_chunk() < 1) fail("expert.min_chunk", fmt::format("= {} must be >= 1", x.min_chunk()));
}

}  // namespace

serve::ServeSpec parse_serve_spec(const std::string& yaml_text, const std::string& source_name,
                                  const std::vector<std::string>& overrides) {
  serve::ServeSpec s = serve_spec_defaults();
  parse_yaml_spec(yaml_text, source_name, overrides, s,
                  [](google::protobuf::Message& m, const spec_fail& fail) {
                    validate_serve(static_cast<serve::ServeSpec&>(m), fail);
                  });
  return s;
}

serve::ServeSpec load_serve_spec(const std::string& path, const std::vector<std::string>& overrides) {
  return parse_serve_spec(read_spec_file(path, "serve"), path, overrides);
}

std::string describe(const serve::ServeSpec& spec) { return describe_spec(spec, "troupe serve spec, defaults filled in"); }

int64_t serve_max_body_bytes(const serve::ServeSpec& spec) {
  return parse_byte_size(spec.server().max_body(), "server.max_body");
}

int64_t serve_kv_cache_bytes(const serve::ServeSpec& spec) {
  return spec.engine().kv_cache_memory().empty() ? 0
                                                 : parse_byte_size(spec.engine().kv_cache_memory(),
                                                                   "engine.kv_cache_memory");
}

namespace {
std::string key_value(const std::string& k, const char* where) {
  if (k.rfind("env:", 0) != 0) return k;
  const char* v = std::getenv(k.substr(4).c_str());
  TROUPE_CHECK(v != nullptr && *v != '\0', errc::not_found, "{} = {}: environment variable {} is not set", where, k,
               k.substr(4));
  return v;
}
}  // namespace

std::string serve_api_key(const serve::ServeSpec& spec) { return key_value(spec.server().api_key(), "server.api_key"); }

std::string serve_admin_key(const serve::ServeSpec& spec) {
  return key_value(spec.server().admin_key(), "server.admin_key");
}

}  // namespace troupe::runtime
