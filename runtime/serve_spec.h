// runtime/serve_spec.h — the serving spec: YAML for humans, a serve::ServeSpec
// (runtime/proto/serve.proto) for the program, with the job spec's mapping and errors.
//
//   serve::ServeSpec s = load_serve_spec("examples/serve_moe/serve.yaml", {"server.port=0"});
//   s.model(); s.server().port(); s.engine().block_size(); serve_max_body_bytes(s);
//   fmt::print("{}", describe(s));                      // the effective spec, parses back the same
//
// Invariants:
//   1. Keys, enums, `--set` overrides and located errors work as in runtime/job_spec.h.
//   2. Every default lives in serve_spec_defaults(); a returned spec has them filled in.
//   3. Checks: `model` given; server.port in [0, 65535]; sizes parse ("1MiB"); engine.ranks,
//      block_size, max_batch_tokens, max_running, max_waiting >= 1; batching continuous | static;
//      the expert settings as parallel.expert of a job.
#pragma once
#include <string>
#include <vector>

#include "runtime/proto/serve.pb.h"

namespace troupe::runtime {

serve::ServeSpec serve_spec_defaults();
serve::ServeSpec parse_serve_spec(const std::string& yaml_text, const std::string& source_name,
                                  const std::vector<std::string>& overrides = {});
serve::ServeSpec load_serve_spec(const std::string& path, const std::vector<std::string>& overrides = {});
std::string describe(const serve::ServeSpec& spec);

// server.max_body in bytes; engine.kv_cache_memory in bytes (0 = auto); the API key after
// "env:NAME" lookup (throws errc::not_found naming NAME when unset).
int64_t serve_max_body_bytes(const serve::ServeSpec& spec);
int64_t serve_kv_cache_bytes(const serve::ServeSpec& spec);
std::string serve_api_key(const serve::ServeSpec& spec);
// server.admin_key, resolved as serve_api_key ("" = the admin API is off).
std::string serve_admin_key(const serve::ServeSpec& spec);

}  // namespace troupe::runtime
