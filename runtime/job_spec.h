// runtime/job_spec.h — the training job spec: YAML for humans, a job::JobSpec
// (runtime/proto/job.proto) for the program.
//
//   job::JobSpec spec = load_job_spec("job.yaml");   // defaults filled, validated
//   log_info("{}", describe(spec));                   // the effective spec, as YAML
//   load_job_spec("job.yaml", {"batch.seq_len=512"});  // `troupe train ... --set`
//   spec.batch().grad_accum(), spec.optimizer().lr(), spec.model().has_create() ...
//
// Invariants:
//   1. A YAML key is a proto field name; an enum value is the lower-case enum value
//      name (`type: yarn`, `format: tokens_u16`, `cp_mode: ring`).
//   2. Every optional field has a default (job_spec_defaults(), one place); `model` has
//      none: exactly one of `model.path` and `model.create` must be given.
//      `model.create` starts from its preset (default `tiny`), then takes the fields given.
//   3. Fields left 0/"" where the proto says so are derived (batch.global_batch or
//      batch.grad_accum, checkpoint.dir, logging.metrics_jsonl); a returned spec has them
//      filled, so describe() shows what will run and parses back to the same spec.
//   4. An unknown key, a wrong type or an impossible value throws errc::invalid_argument
//      (YAML syntax: errc::format; missing file: errc::not_found) whose message names
//      `file:line:col`, the key path (`optimizer.warmup_steps`) and a hint how to fix it.
//   5. A list of mappings (memory.tiers) maps item by item; errors name the index:
//      `memory.tiers[1].numa_nodes`.
//   6. Without yaml-cpp (TROUPE_HAVE_YAML_CPP unset) parsing throws errc::unsupported;
//      job_spec_defaults, validate_job_spec and describe still work.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/memory_tiers.h"
#include "runtime/proto/job.pb.h"

namespace troupe::runtime {

// Reads and parses a YAML job file; errors name `path:line:col`. Each override
// ("optimizer.lr=1e-3", "model.path=runs/a/checkpoints/final", a YAML value) replaces
// that key before mapping, as if written in the file; errors in it name the `--set`.
job::JobSpec load_job_spec(const std::string& path, const std::vector<std::string>& overrides = {});

// Parses YAML text; `source_name` stands for the file in error messages.
job::JobSpec parse_job_spec(const std::string& yaml_text, const std::string& source_name,
                            const std::vector<std::string>& overrides = {});

// Every default (model left empty). parse_job_spec starts from this spec.
job::JobSpec job_spec_defaults();
// The defaults of parallel.expert (also a serve spec's `expert`).
void expert_parallel_defaults(job::ExpertParallel& x);

// Fills the derived fields (invariant 3) and checks every value; throws
// errc::invalid_argument naming the key. Parsing calls it; call it after editing a spec.
void validate_job_spec(job::JobSpec& spec, const std::string& source_name = "job spec");

// The spec as YAML, every field included (oneof: only the one set), in proto order.
std::string describe(const job::JobSpec& spec);

// The same YAML -> protobuf mapping (invariants 1, 4, 5, 6) for another spec message (the serve
// spec, runtime/serve_spec.h): `msg` holds its defaults on entry; `validate(msg, fail)` checks the
// result and reports a problem with fail(key, problem), which throws errc::invalid_argument naming
// `file:line:col` of that key (or that it is a default).
using spec_fail = std::function<void(const std::string& key, const std::string& problem)>;
void parse_yaml_spec(const std::string& yaml_text, const std::string& source_name,
                     const std::vector<std::string>& overrides, google::protobuf::Message& msg,
                     const std::function<void(google::protobuf::Message&, const spec_fail&)>& validate);
// A spec file's text; errc::not_found / errc::io naming it.
std::string read_spec_file(const std::string& path, const char* what);
// Any spec message as YAML (as describe does for job specs), under a `# title` line.
std::string describe_spec(const google::protobuf::Message& msg, const std::string& title);

// Ranks the job runs on: parallel.dp * parallel.cp.
int64_t job_world_size(const job::JobSpec& spec);

// "24GiB", "512 MiB", "1.5GB", "4096" -> bytes (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB
// of 1000, B or nothing is bytes). Throws errc::invalid_argument naming `what` and the text.
int64_t parse_byte_size(const std::string& text, const std::string& what);

// memory.device_budget in bytes; 0 when not set (no budget, no arena).
int64_t job_device_budget(const job::JobSpec& spec);
// memory.memo.alpha: a value in [0, 1], or -1 for "auto" / "".
double job_memo_alpha(const job::JobSpec& spec);
// memory.memo.keep_last_layers, default 2.
int64_t job_memo_keep_last_layers(const job::JobSpec& spec);
// memory.host_limit in bytes; 0 = unlimited.
int64_t job_host_limit(const job::JobSpec& spec);

// memory.placement: the host placement policy the job runs with ("latency_first", "dram_only",
// "interleave_all", "cxl_only"), or "" when its host memory is not placed through the tiers
// (memory.placement not set and no memory.tiers declared: the heap, as before).
std::string job_host_placement(const job::JobSpec& spec);
// memory.local_dram_budget in bytes; "" = the capacity of the first dram tier of `tiers` (0 when none).
int64_t job_local_dram_budget(const job::JobSpec& spec, const std::vector<memory_tier>& tiers);

// memory.tiers mapped onto the NUMA nodes of `machine` (default: this machine's,
// numa_nodes_with_memory()). No tiers declared: the discovered tiers (memory_tiers.h). A node
// the machine lacks throws errc::invalid_argument naming the tier and the nodes that exist; a
// capacity beyond the nodes' memory too. capacity "" = the nodes' total. A cxl tier on nodes
// with CPUs, or with emulated_gbps/latency set, is emulated (memory_tiers.h invariant 3):
// that is how a machine without CXL runs the CXL placement.
std::vector<memory_tier> tiers_from_spec(const job::JobSpec& spec, const std::vector<numa_node_info>& machine);
std::vector<memory_tier> tiers_from_spec(const job::JobSpec& spec);

}  // namespace troupe::runtime
