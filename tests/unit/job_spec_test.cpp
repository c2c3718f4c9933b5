// tests/unit/job_spec_test.cpp — the YAML job spec: a full spec lands field by field in
// the proto and describe() parses back to the same spec; defaults and derived fields;
// every class of error (unknown key, wrong type, impossible value, bad enum, YAML syntax)
// with its exact location and hint; the example job of examples/finetune_long_context.
#include "runtime/job_spec.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <string>

#include "runtime/error.h"

using namespace troupe::runtime;
namespace job = troupe::job;

namespace {

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

[[maybe_unused]] bool same(const job::JobSpec& a, const job::JobSpec& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// The message of the error parse_job_spec(yaml) throws, checking its code.
[[maybe_unused]] std::string error_of(const std::string& yaml, errc code = errc::invalid_argument) {
  try {
    parse_job_spec(yaml, "job.yaml");
  } catch (const error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.message();
  }
  ADD_FAILURE() << "no error for:\n" << yaml;
  return "";
}

// A valid base that the error tests extend with one more block.
const std::string base = "model:\n  path: /models/tiny\ndata:\n  train: train.bin\n  format: tokens_u16\n";

}  // namespace

#ifdef TROUPE_HAVE_YAML_CPP

TEST(job_spec, full_spec_lands_in_the_proto_and_round_trips) {
  const std::string yaml = R"(# a comment
model:
  create:
    preset: small
    hidden: 128
    layers: 3
    heads: 8
    kv_heads: 2
    intermediate: 344
    vocab: 512
    max_position: 512
    rope_theta: 500000
    rms_norm_eps: 1.0e-6
    tie_embeddings: true
  rope_scaling:
    type: yarn
    factor: 4
    original_max_position: 512
    beta_fast: 16
    beta_slow: 2
    low_freq_factor: 1.5
    high_freq_factor: 3
data:
  train: "data/my tokens.bin"
  format: tokens_u32
  val_fraction: 0.05
  seed: 7
batch:
  seq_len: 2048
  micro_batch: 2
  global_batch: 32
optimizer:
  lr: 3.0e-4
  min_lr: 3e-5
  warmup_steps: 50
  betas: [0.8, 0.99]
  eps: 1e-6
  weight_decay: 0.01
  grad_clip: 0.5
train:
  max_steps: 400
  eval_every_steps: 25
  eval_batches: 3
parallel:
  dp: 2
  cp: 2
  cp_mode: ring
checkpoint:
  dir: /ckpt
  every_steps: 100
  keep: 0
logging:
  metrics_jsonl: m.jsonl
  every_steps: 5
seed: 99
run_dir: runs/x
)";
  const job::JobSpec s = parse_job_spec(yaml, "job.yaml");
  ASSERT_TRUE(s.model().has_create());
  const auto& c = s.model().create();
  EXPECT_EQ(c.preset(), job::CreateModel::SMALL);
  EXPECT_EQ(c.hidden(), 128);
  EXPECT_EQ(c.layers(), 3);
  EXPECT_EQ(c.heads(), 8);
  EXPECT_EQ(c.kv_heads(), 2);
  EXPECT_EQ(c.intermediate(), 344);
  EXPECT_EQ(c.vocab(), 512);
  EXPECT_EQ(c.max_position(), 512);
  EXPECT_EQ(c.rope_theta(), 500000.0);
  EXPECT_EQ(c.rms_norm_eps(), 1e-6);
  EXPECT_TRUE(c.tie_embeddings());
  const auto& r = s.model().rope_scaling();
  EXPECT_EQ(r.type(), job::RopeScaling::YARN);
  EXPECT_EQ(r.factor(), 4.0);
  EXPECT_EQ(r.original_max_position(), 512);
  EXPECT_EQ(r.beta_fast(), 16.0);
  EXPECT_EQ(r.beta_slow(), 2.0);
  EXPECT_EQ(r.low_freq_factor(), 1.5);
  EXPECT_EQ(r.high_freq_factor(), 3.0);
  EXPECT_EQ(s.data().train(), "data/my tokens.bin");
  EXPECT_EQ(s.data().format(), job::Data::TOKENS_U32);
  EXPECT_EQ(s.data().val_fraction(), 0.05);
  EXPECT_EQ(s.data().seed(), 7u);
  EXPECT_EQ(s.batch().seq_len(), 2048);
  EXPECT_EQ(s.batch().micro_batch(), 2);
  EXPECT_EQ(s.batch().global_batch(), 32);
  EXPECT_EQ(s.batch().grad_accum(), 8);  // derived: 32 / (2 * dp 2)
  EXPECT_EQ(s.optimizer().lr(), 3e-4);
  EXPECT_EQ(s.optimizer().min_lr(), 3e-5);
  EXPECT_EQ(s.optimizer().warmup_steps(), 50);
  ASSERT_EQ(s.optimizer().betas_size(), 2);
  EXPECT_EQ(s.optimizer().betas(0), 0.8);
  EXPECT_EQ(s.optimizer().betas(1), 0.99);
  EXPECT_EQ(s.optimizer().eps(), 1e-6);
  EXPECT_EQ(s.optimizer().weight_decay(), 0.01);
  EXPECT_EQ(s.optimizer().grad_clip(), 0.5);
  EXPECT_EQ(s.train().max_steps(), 400);
  EXPECT_EQ(s.train().eval_every_steps(), 25);
  EXPECT_EQ(s.train().eval_batches(), 3);
  EXPECT_EQ(s.parallel().dp(), 2);
  EXPECT_EQ(s.parallel().cp(), 2);
  EXPECT_EQ(s.parallel().cp_mode(), job::Parallel::RING);
  EXPECT_EQ(job_world_size(s), 4);
  EXPECT_EQ(s.checkpoint().dir(), "/ckpt");
  EXPECT_EQ(s.checkpoint().every_steps(), 100);
  EXPECT_EQ(s.checkpoint().keep(), 0);
  EXPECT_EQ(s.logging().metrics_jsonl(), "m.jsonl");
  EXPECT_EQ(s.logging().every_steps(), 5);
  EXPECT_EQ(s.seed(), 99u);
  EXPECT_EQ(s.run_dir(), "runs/x");

  const std::string text = describe(s);
  const job::JobSpec back = parse_job_spec(text, "described.yaml");
  EXPECT_TRUE(same(s, back)) << text;
  EXPECT_EQ(describe(back), text);
  EXPECT_HAS(text, "  rope_scaling:\n    type: yarn\n    factor: 4\n");
  EXPECT_HAS(text, "  betas: [0.8, 0.99]\n");
  EXPECT_HAS(text, "  train: \"data/my tokens.bin\"\n");
}

TEST(job_spec, defaults_and_derived_fields) {
  const job::JobSpec s = parse_job_spec(base, "job.yaml");
  job::JobSpec expect = job_spec_defaults();
  expect.mutable_model()->set_path("/models/tiny");
  expect.mutable_data()->set_train("train.bin");
  expect.mutable_data()->set_format(job::Data::TOKENS_U16);
  expect.mutable_batch()->set_global_batch(1);  // micro 1 * accum 1 * dp 1
  expect.mutable_batch()->set_grad_accum(1);
  expect.mutable_checkpoint()->set_dir("runs/train/checkpoints");
  expect.mutable_logging()->set_metrics_jsonl("runs/train/metrics.jsonl");
  EXPECT_TRUE(same(s, expect)) << describe(s);
  // The documented defaults, spelled out.
  EXPECT_EQ(s.model().rope_scaling().type(), job::RopeScaling::NONE);
  EXPECT_EQ(s.model().rope_scaling().factor(), 1.0);
  EXPECT_EQ(s.model().rope_scaling().beta_fast(), 32.0);
  EXPECT_EQ(s.model().rope_scaling().high_freq_factor(), 4.0);
  EXPECT_EQ(s.data().val_fraction(), 0.1);
  EXPECT_EQ(s.batch().seq_len(), 256);
  EXPECT_EQ(s.optimizer().lr(), 3e-4);
  EXPECT_EQ(s.optimizer().betas(1), 0.95);
  EXPECT_EQ(s.optimizer().weight_decay(), 0.1);
  EXPECT_EQ(s.optimizer().grad_clip(), 1.0);
  EXPECT_EQ(s.train().max_steps(), 1000);
  EXPECT_EQ(s.parallel().cp_mode(), job::Parallel::ULYSSES);
  EXPECT_EQ(s.checkpoint().every_steps(), 500);
  EXPECT_EQ(s.logging().every_steps(), 10);
  EXPECT_EQ(s.seed(), 1234u);
  EXPECT_TRUE(same(parse_job_spec(describe(s), "d.yaml"), s));

  // grad_accum given: global derived; both given and consistent: kept.
  auto g = parse_job_spec(base + "batch: {micro_batch: 4, grad_accum: 3}\nparallel: {dp: 2}\n", "job.yaml");
  EXPECT_EQ(g.batch().global_batch(), 24);
  EXPECT_EQ(g.batch().grad_accum(), 3);
  g = parse_job_spec(base + "batch: {micro_batch: 4, grad_accum: 3, global_batch: 24}\nparallel: {dp: 2}\n",
                     "job.yaml");
  EXPECT_EQ(g.batch().grad_accum(), 3);

  // create: the preset fills, written fields override; an empty create is the tiny preset.
  auto c = parse_job_spec("model:\n  create:\n    hidden: 96\ndata: {train: t.txt}\nbatch: {seq_len: 64}\n",
                          "job.yaml");
  EXPECT_EQ(c.model().create().preset(), job::CreateModel::TINY);
  EXPECT_EQ(c.model().create().hidden(), 96);
  EXPECT_EQ(c.model().create().layers(), 2);
  EXPECT_EQ(c.model().create().heads(), 4);
  EXPECT_EQ(c.model().create().kv_heads(), 2);
  EXPECT_EQ(c.model().create().vocab(), 258);
  EXPECT_EQ(c.data().format(), job::Data::TEXT);
  c = parse_job_spec("model:\n  create:\ndata: {train: t.txt}\nbatch: {seq_len: 64}\n", "job.yaml");
  EXPECT_EQ(c.model().create().hidden(), 64);
  EXPECT_EQ(c.model().create().max_position(), 256);
  c = parse_job_spec("model: {create: {preset: small}}\ndata: {train: t.txt}\n", "job.yaml");
  EXPECT_EQ(c.model().create().hidden(), 256);
  EXPECT_EQ(c.model().create().layers(), 4);
}

TEST(job_spec, expert_parallel_settings_are_checked_with_their_location) {
  const auto s = parse_job_spec(base + "parallel: {dp: 2, ep: 2, expert: {mode: eplb, rebalance: {enabled: true}}}\n",
                                "job.yaml");
  EXPECT_EQ(s.parallel().ep(), 2);
  EXPECT_EQ(s.parallel().expert().mode(), "eplb");
  EXPECT_DOUBLE_EQ(s.parallel().expert().lambda(), 1.3);  // defaults filled in
  EXPECT_EQ(s.parallel().expert().rebalance().patience(), 3);
  EXPECT_HAS(error_of(base + "parallel: {dp: 2, ep: 2, expert: {mode: lpt}}\n"),
             "`parallel.expert.mode` at job.yaml:6:41 'lpt' is not one of llep, ep, eplb");
  EXPECT_HAS(error_of(base + "parallel: {dp: 2, ep: 2, expert: {lambda: 0.5}}\n"), "`parallel.expert.lambda`");
  EXPECT_HAS(error_of(base + "parallel: {dp: 2, ep: 2, expert: {rebalance: {decay: 1.0}}}\n"),
             "`parallel.expert.rebalance.decay`");
  EXPECT_HAS(error_of(base + "parallel: {dp: 4, ep: 2}\n"), "must be 1 (off) or dp * cp = 4");
}

TEST(job_spec, unknown_keys_name_location_path_and_hint) {
  EXPECT_EQ(error_of(base + "optimizer:\n  lr: 1e-3\n  warmup: 10\n"),
            "unknown key `optimizer.warmup` at job.yaml:8:3; did you mean `warmup_steps`? (`optimizer` takes: "
            "lr, min_lr, warmup_steps, betas, eps, weight_decay, grad_clip)");
  EXPECT_EQ(error_of(base + "optimiser: {lr: 1e-3}\n"),
            "unknown key `optimiser` at job.yaml:6:1; did you mean `optimizer`? (the top level takes: model, "
            "data, batch, optimizer, train, parallel, checkpoint, logging, seed, run_dir, memory)");
  EXPECT_EQ(error_of(base + "batch:\n  seqlen: 128\n"),
            "unknown key `batch.seqlen` at job.yaml:7:3; did you mean `seq_len`? (`batch` takes: seq_len, "
            "micro_batch, global_batch, grad_accum)");
  EXPECT_EQ(error_of(base + "foo: 1\n").find("did you mean"), std::string::npos);
  EXPECT_EQ(error_of(base + "parallel:\n  tensor_parallel: 2\n"),
            "unknown key `parallel.tensor_parallel` at job.yaml:7:3 (`parallel` takes: dp, cp, cp_mode, ep, expert)");
  EXPECT_HAS(error_of("model:\n  path: /m\n  rope_scaling:\n    typ: yarn\ndata: {train: t}\n"),
             "unknown key `model.rope_scaling.typ` at job.yaml:4:5; did you mean `type`?");
}

TEST(job_spec, memory_section_sizes_alpha_and_defaults) {
  EXPECT_EQ(parse_byte_size("24GiB", "x"), int64_t{24} << 30);
  EXPECT_EQ(parse_byte_size("512 MiB", "x"), int64_t{512} << 20);
  EXPECT_EQ(parse_byte_size("1.5GB", "x"), 1500000000);
  EXPECT_EQ(parse_byte_size("4096", "x"), 4096);
  EXPECT_EQ(parse_byte_size("2k", "x"), 2048);
  EXPECT_THROW(parse_byte_size("12 parsecs", "x"), error);
  EXPECT_THROW(parse_byte_size("-1GiB", "x"), error);
  EXPECT_THROW(parse_byte_size("", "x"), error);

  const auto d = parse_job_spec(base, "job.yaml");
  EXPECT_EQ(job_device_budget(d), 0);
  EXPECT_FALSE(d.memory().memo().enabled());
  EXPECT_EQ(job_memo_alpha(d), -1);
  EXPECT_EQ(job_memo_keep_last_layers(d), 2);
  EXPECT_EQ(job_host_limit(d), 0);
  const auto m = parse_job_spec(base + "memory:\n  device_budget: 6GiB\n  host_limit: 64GiB\n  memo: {enabled: true, "
                                       "alpha: 0.25, keep_last_layers: 0}\n",
                                "job.yaml");
  EXPECT_EQ(job_device_budget(m), int64_t{6} << 30);
  EXPECT_EQ(job_host_limit(m), int64_t{64} << 30);
  EXPECT_EQ(job_memo_alpha(m), 0.25);
  EXPECT_EQ(job_memo_keep_last_layers(m), 0);
  EXPECT_TRUE(same(parse_job_spec(describe(m), "d.yaml"), m));

  EXPECT_HAS(error_of(base + "memory:\n  device_budget: 6 parsecs\n"),
             "`memory.device_budget` at job.yaml:7:18 is not a size");
  EXPECT_HAS(error_of(base + "memory:\n  device_budget: 0\n"), "`memory.device_budget` at job.yaml:7:18 must be positive");
  EXPECT_HAS(error_of(base + "memory:\n  memo: {alpha: 1.5}\n"),
             "`memory.memo.alpha` at job.yaml:7:17 must be auto or a number in [0, 1], got '1.5'");
  EXPECT_HAS(error_of(base + "memory:\n  memo: {keep_last_layers: -1}\n"), "`memory.memo.keep_last_layers`");
  EXPECT_HAS(error_of(base + "memory:\n  memo: {copy_bandwidth_gbps: -3}\n"), "`memory.memo.copy_bandwidth_gbps`");
}

TEST(job_spec, memory_tiers_map_list_items_and_name_the_index) {
  const std::string tiers = base + R"(memory:
  tiers:
    - name: local
      kind: dram
      numa_nodes: [0]
    - {name: far, kind: cxl, numa_nodes: [1, 2], capacity: 256GiB}
    - name: emu
      kind: cxl
      numa_nodes: [0]
      capacity: 8GiB
      emulated_gbps: 20
      emulated_latency_ns: 250
)";
  const auto s = parse_job_spec(tiers, "job.yaml");
  ASSERT_EQ(s.memory().tiers_size(), 3);
  EXPECT_EQ(s.memory().tiers(0).name(), "local");
  EXPECT_EQ(s.memory().tiers(1).kind(), job::Tier::CXL);
  EXPECT_EQ(s.memory().tiers(1).numa_nodes_size(), 2);
  EXPECT_EQ(s.memory().tiers(2).emulated_latency_ns(), 250);
  // describe() writes the list as block items and parses back to the same spec.
  const std::string text = describe(s);
  EXPECT_HAS(text, "  tiers:\n    - name: \"local\"\n      kind: dram\n      numa_nodes: [0]\n");
  EXPECT_TRUE(same(parse_job_spec(text, "d.yaml"), s)) << text;
  EXPECT_HAS(describe(parse_job_spec(base, "job.yaml")), "  tiers: []\n");
  // --set replaces the whole list.
  const auto o = parse_job_spec(base, "job.yaml", {"memory.tiers=[{name: a, numa_nodes: [0]}]"});
  ASSERT_EQ(o.memory().tiers_size(), 1);
  EXPECT_EQ(o.memory().tiers(0).kind(), job::Tier::DRAM);

  // Errors name the index, the file position and the fix.
  const std::string m = base + "memory:\n  tiers:\n";
  EXPECT_EQ(error_of(m + "    - {name: a, numa_nodes: [0]}\n    - {name: b, numa_nodes: [x]}\n"),
            "`memory.tiers[1].numa_nodes` at job.yaml:9:30 must be an integer, got 'x'");
  EXPECT_EQ(error_of(m + "    - {name: a, kind: pmem, numa_nodes: [0]}\n"),
            "`memory.tiers[0].kind` at job.yaml:8:23 must be one of dram, cxl, got 'pmem'");
  EXPECT_HAS(error_of(m + "    - {name: a, numa_node: [0]}\n"),
             "unknown key `memory.tiers[0].numa_node` at job.yaml:8:17; did you mean `numa_nodes`?");
  EXPECT_EQ(error_of(m + "    - dram\n"),
            "`memory.tiers[0]` at job.yaml:8:7 must be a mapping of keys (name: ...), got 'dram'");
  EXPECT_HAS(error_of(base + "memory:\n  tiers: {name: a}\n"), "`memory.tiers` at job.yaml:7:10 must be a list");
  EXPECT_HAS(error_of(m + "    - {name: a, numa_nodes: []}\n"), "`memory.tiers[0].numa_nodes` at job.yaml:8:29 is empty");
  EXPECT_HAS(error_of(m + "    - {name: a, numa_nodes: [0]}\n    - {name: a, numa_nodes: [1]}\n"),
             "`memory.tiers[1].name` at job.yaml:9:14 'a' is also the name of memory.tiers[0]");
  EXPECT_HAS(error_of(m + "    - {name: a, numa_nodes: [0], capacity: lots}\n"),
             "`memory.tiers[0].capacity` at job.yaml:8:44 is not a size: memory.tiers[0].capacity: 'lots' is not a size");
  EXPECT_HAS(error_of(m + "    - {name: a, numa_nodes: [0], emulated_gbps: 5}\n"),
             "`memory.tiers[0].kind` at job.yaml (default) is dram but tier 'a' sets emulated_gbps");
  EXPECT_HAS(error_of(m + "    - {name: a, kind: cxl, numa_nodes: [0], emulated_latency_ns: -1}\n"),
             "`memory.tiers[0].emulated_latency_ns`");
  EXPECT_HAS(error_of(m + "    - {numa_nodes: [0]}\n"), "`memory.tiers[0].name` at job.yaml (default) is missing");
}

TEST(job_spec, tiers_from_spec_maps_onto_the_machine) {
  constexpr int64_t GiB = int64_t{1} << 30;
  // A machine with DRAM node 0 (CPUs) and a CXL card, node 1 (CPU-less); and one without CXL.
  const std::vector<numa_node_info> cxl_box{{0, 128 * GiB, 100 * GiB, 32}, {1, 256 * GiB, 256 * GiB, 0}};
  const std::vector<numa_node_info> plain_box{{0, 64 * GiB, 60 * GiB, 16}};
  // Nothing declared: one tier per kind, from the nodes.
  auto t = tiers_from_spec(parse_job_spec(base, "job.yaml"), cxl_box);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].name, "dram");
  EXPECT_EQ(t[1].type, memory_tier::cxl);
  EXPECT_EQ(t[1].numa_nodes, std::vector<int>{1});
  EXPECT_EQ(t[1].capacity_bytes, 256 * GiB);
  EXPECT_FALSE(t[1].emulated);
  // Declared: a real CXL tier is not emulated; a CXL tier on a DRAM node is.
  const auto spec = parse_job_spec(base + "memory:\n  tiers:\n    - {name: local, numa_nodes: [0], capacity: 60GiB}\n"
                                          "    - {name: far, kind: cxl, numa_nodes: [1]}\n", "job.yaml");
  t = tiers_from_spec(spec, cxl_box);
  EXPECT_EQ(t[0].capacity_bytes, 60 * GiB);
  EXPECT_EQ(t[1].capacity_bytes, 256 * GiB);
  EXPECT_FALSE(t[1].emulated);
  const auto emu = parse_job_spec(base + "memory:\n  tiers:\n    - {name: local, numa_nodes: [0], capacity: 32GiB}\n"
                                         "    - {name: cxl, kind: cxl, numa_nodes: [0], capacity: 16GiB, "
                                         "emulated_gbps: 25, emulated_latency_ns: 200}\n", "job.yaml");
  t = tiers_from_spec(emu, plain_box);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_TRUE(t[1].emulated);
  EXPECT_EQ(t[1].numa_nodes, std::vector<int>{0});
  EXPECT_EQ(t[1].emulated_gbps, 25);
  EXPECT_EQ(t[1].emulated_latency_ns, 200);
  // The CXL spec on the machine without node 1: the error names the tier and the nodes there are.
  try {
    tiers_from_spec(spec, plain_box);
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::invalid_argument);
    EXPECT_HAS(e.message(), "memory.tiers[1] ('far'): NUMA node 1 does not exist on this machine (nodes with memory: "
                            "0 (dram, 64.0 GiB))");
  }
  try {
    tiers_from_spec(emu, {{0, 20 * GiB, 20 * GiB, 4}});
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_HAS(e.message(), "memory.tiers[0] ('local'): capacity 32GiB (34359738368 bytes) exceeds the memory of its nodes");
  }
}

TEST(job_spec, host_placement_policy_and_local_dram_budget) {
  constexpr int64_t GiB = int64_t{1} << 30;
  const std::vector<numa_node_info> box{{0, 64 * GiB, 60 * GiB, 16}};
  // Nothing set: host memory is not placed; the budget is the dram tier's capacity.
  const auto d = parse_job_spec(base, "job.yaml");
  EXPECT_EQ(job_host_placement(d), "");
  EXPECT_EQ(job_local_dram_budget(d, tiers_from_spec(d, box)), 64 * GiB);
  EXPECT_EQ(job_local_dram_budget(d, {}), 0) << "no dram tier";
  // Tiers declared: latency_first by default.
  const std::string tiers = base + "memory:\n  tiers:\n    - {name: local, numa_nodes: [0], capacity: 32GiB}\n"
                                   "    - {name: cxl, kind: cxl, numa_nodes: [0], capacity: 16GiB, emulated_gbps: 50}\n";
  const auto t = parse_job_spec(tiers, "job.yaml");
  EXPECT_EQ(job_host_placement(t), "latency_first");
  EXPECT_EQ(job_local_dram_budget(t, tiers_from_spec(t, box)), 32 * GiB);
  // Given: the policy and the budget as written; describe() parses back to the same spec.
  const auto g = parse_job_spec(tiers + "  placement: interleave_all\n  local_dram_budget: 100MiB\n", "job.yaml");
  EXPECT_EQ(job_host_placement(g), "interleave_all");
  EXPECT_EQ(job_local_dram_budget(g, tiers_from_spec(g, box)), 100 * (int64_t{1} << 20));
  EXPECT_HAS(describe(g), "  placement: \"interleave_all\"\n  local_dram_budget: \"100MiB\"\n");
  EXPECT_TRUE(same(parse_job_spec(describe(g), "d.yaml"), g));
  // A policy without declared tiers places on the discovered ones; --set works; a 0 budget is allowed.
  const auto o = parse_job_spec(base, "job.yaml", {"memory.placement=dram_only", "memory.local_dram_budget=0"});
  EXPECT_EQ(job_host_placement(o), "dram_only");
  EXPECT_EQ(job_local_dram_budget(o, tiers_from_spec(o, box)), 0);
  EXPECT_EQ(job_host_placement(parse_job_spec(base, "job.yaml", {"memory.placement=cxl_only"})), "cxl_only");
  // Errors name the key, the position and the choices.
  EXPECT_EQ(error_of(base + "memory:\n  placement: fastest\n"),
            "`memory.placement` at job.yaml:7:14 must be one of latency_first, dram_only, interleave_all, cxl_only, "
            "got 'fastest' (leave it out for latency_first when memory.tiers are declared)");
  EXPECT_HAS(error_of(base + "memory:\n  local_dram_budget: lots\n"),
             "`memory.local_dram_budget` at job.yaml:7:22 is not a size");
  EXPECT_HAS(error_of(base + "memory:\n  local_dram_budget: -1GiB\n"), "`memory.local_dram_budget`");
}

TEST(job_spec, wrong_types_name_location_and_expected_type) {
  EXPECT_EQ(error_of("model:\n  path: /m\nbatch:\n  seq_len: abc\n"),
            "`batch.seq_len` at job.yaml:4:12 must be an integer, got 'abc'");
  EXPECT_EQ(error_of("model:\n  path: /m\nbatch:\n  seq_len: 1.5\n"),
            "`batch.seq_len` at job.yaml:4:12 must be an integer, got '1.5'");
  EXPECT_EQ(error_of("model:\n  path: /m\nbatch:\n  seq_len: [1, 2]\n"),
            "`batch.seq_len` at job.yaml:4:12 must be an integer, got a list");
  EXPECT_EQ(error_of(base + "optimizer:\n  lr: fast\n"), "`optimizer.lr` at job.yaml:7:7 must be a finite number, got 'fast'");
  EXPECT_EQ(error_of(base + "optimizer:\n  lr: .nan\n"), "`optimizer.lr` at job.yaml:7:7 must be a finite number, got '.nan'");
  EXPECT_EQ(error_of(base + "optimizer:\n  betas: 0.9\n"),
            "`optimizer.betas` at job.yaml:7:10 must be a list like [a, b], got '0.9'");
  EXPECT_EQ(error_of(base + "optimizer:\n  betas: [0.9, x]\n"),
            "`optimizer.betas` at job.yaml:7:16 must be a finite number, got 'x'");
  EXPECT_EQ(error_of(base + "seed: -1\n"), "`seed` at job.yaml:6:7 must be a non-negative integer, got '-1'");
  EXPECT_EQ(error_of(base + "batch:\n  seq_len: 99999999999999999999\n"),
            "`batch.seq_len` at job.yaml:7:12 must be an integer in [-9223372036854775808, 9223372036854775807], "
            "got '99999999999999999999'");
  EXPECT_EQ(error_of("model:\n  create: {tie_embeddings: maybe}\ndata: {train: t}\n"),
            "`model.create.tie_embeddings` at job.yaml:2:28 must be true or false, got 'maybe'");
  EXPECT_EQ(error_of(base + "optimizer: 3\n"),
            "`optimizer` at job.yaml:6:12 must be a mapping of keys (lr: ...), got '3'");
  EXPECT_EQ(error_of("- model\n- data\n"),
            "the job spec at job.yaml:1:1 must be a mapping of keys (model: ...), got a list");
  EXPECT_EQ(error_of(base + "optimizer:\n  lr:\n"),
            "`optimizer.lr` at job.yaml:7:3 has no value; write one, or remove the key to take the default");
  EXPECT_EQ(error_of(base + "seed: 1\nseed: 2\n"), "`seed` at job.yaml:7:1 is given twice (first at job.yaml:6:1); keep one");
  EXPECT_EQ(error_of("model:\n  path: /m\n  create: {}\ndata: {train: t}\n"),
            "`model.create` at job.yaml:3:3 conflicts with `model.path` at job.yaml:2:3: give only one of path, create");
}

TEST(job_spec, enums_list_the_valid_values) {
  EXPECT_EQ(error_of("model:\n  path: /m\n  rope_scaling: {type: yarnn, factor: 2}\ndata: {train: t}\n"),
            "`model.rope_scaling.type` at job.yaml:3:24 must be one of none, linear, yarn, llama3, got 'yarnn'; "
            "did you mean `yarn`?");
  EXPECT_EQ(error_of("model: {path: /m}\ndata: {train: t, format: u16}\n"),
            "`data.format` at job.yaml:2:26 must be one of text, tokens_u16, tokens_u32, got 'u16'; "
            "did you mean `tokens_u16`?");
  EXPECT_EQ(error_of(base + "parallel: {cp_mode: allgather}\n"),
            "`parallel.cp_mode` at job.yaml:6:21 must be one of ulysses, ring, got 'allgather'");
  EXPECT_EQ(error_of("model: {create: {preset: huge}}\ndata: {train: t}\n"),
            "`model.create.preset` at job.yaml:1:26 must be one of tiny, small, got 'huge'");
  // Values are lower case, as describe() writes them.
  EXPECT_HAS(error_of(base + "parallel: {cp_mode: RING}\n"), "must be one of ulysses, ring, got 'RING'");
}

TEST(job_spec, impossible_values_name_location_and_fix) {
  EXPECT_EQ(error_of(base + "batch:\n  seq_len: 0\n"), "`batch.seq_len` at job.yaml:7:12 must be positive, got 0");
  EXPECT_EQ(error_of(base + "batch:\n  micro_batch: 4\n  global_batch: 10\nparallel:\n  dp: 2\n"),
            "`batch.global_batch` at job.yaml:8:17 = 10 is not divisible by batch.micro_batch * parallel.dp = "
            "4 * 2 = 8; make it a multiple of 8");
  EXPECT_EQ(error_of(base + "batch: {micro_batch: 2, grad_accum: 3, global_batch: 8}\n"),
            "`batch.global_batch` at job.yaml:6:54 = 8 differs from batch.micro_batch * batch.grad_accum * "
            "parallel.dp = 2 * 3 * 1 = 6; give only one of global_batch and grad_accum");
  EXPECT_EQ(error_of(base + "optimizer:\n  lr: -0.001\n"), "`optimizer.lr` at job.yaml:7:7 must be positive, got -0.001");
  EXPECT_EQ(error_of(base + "optimizer:\n  lr: 1e-3\n  min_lr: 1e-2\n"),
            "`optimizer.min_lr` at job.yaml:8:11 must be in [0, optimizer.lr = 0.001], got 0.01");
  EXPECT_EQ(error_of(base + "optimizer:\n  warmup_steps: 500\ntrain:\n  max_steps: 100\n"),
            "`optimizer.warmup_steps` at job.yaml:7:17 = 500 exceeds train.max_steps = 100 (at job.yaml:9:14); "
            "lower warmup_steps or raise max_steps");
  // A default takes part: the message says so.
  EXPECT_EQ(error_of(base + "optimizer:\n  warmup_steps: 5000\n"),
            "`optimizer.warmup_steps` at job.yaml:7:17 = 5000 exceeds train.max_steps = 1000 (at job.yaml "
            "(default)); lower warmup_steps or raise max_steps");
  EXPECT_EQ(error_of(base + "optimizer:\n  betas: [0.9, 0.95, 0.99]\n"),
            "`optimizer.betas` at job.yaml:7:10 must hold exactly two values [beta1, beta2], got 3");
  EXPECT_EQ(error_of(base + "optimizer:\n  betas: [0.9, 1.0]\n"),
            "`optimizer.betas` at job.yaml:7:10 values must be in [0, 1), got 1");
  EXPECT_EQ(error_of("model:\n  path: /m\n  rope_scaling:\n    type: linear\n    factor: 0.5\ndata: {train: t}\n"),
            "`model.rope_scaling.factor` at job.yaml:5:13 must be >= 1 for type linear (new context / trained "
            "context), got 0.5");
  EXPECT_EQ(error_of("model:\n  path: /m\n  rope_scaling:\n    factor: 4\ndata: {train: t}\n"),
            "`model.rope_scaling.factor` at job.yaml:4:13 = 4 has no effect with type none; set "
            "model.rope_scaling.type to linear, yarn or llama3");
  EXPECT_EQ(error_of("model:\n  path: /m\n  rope_scaling: {type: yarn, factor: 2, beta_fast: 1, beta_slow: 2}\n"
                     "data: {train: t}\n"),
            "`model.rope_scaling.beta_fast` at job.yaml:3:52 = 1 and beta_slow = 2 must satisfy beta_fast > "
            "beta_slow > 0 (default 32 and 1)");
  EXPECT_EQ(error_of("model:\n  path: /m\n  rope_scaling: {type: llama3, factor: 8, high_freq_factor: 0.5}\n"
                     "data: {train: t}\n"),
            "`model.rope_scaling.high_freq_factor` at job.yaml:3:61 = 0.5 and low_freq_factor = 1 must satisfy "
            "high > low > 0 (default 4 and 1)");
  EXPECT_EQ(error_of(base + "  val_fraction: 1\n"), "`data.val_fraction` at job.yaml:6:17 must be in [0, 1), got 1");
  EXPECT_EQ(error_of(base + "  val_fraction: -0.1\n"),
            "`data.val_fraction` at job.yaml:6:17 must be in [0, 1), got -0.1");
  EXPECT_EQ(error_of(base + "parallel: {cp: 3}\nbatch: {seq_len: 128}\n"),
            "`batch.seq_len` at job.yaml:7:18 = 128 must be divisible by parallel.cp = 3, which splits each sequence");
  EXPECT_EQ(error_of(base + "parallel: {dp: 0}\n"), "`parallel.dp` at job.yaml:6:16 must be >= 1, got 0");
  EXPECT_EQ(error_of("model: {create: {heads: 4, kv_heads: 4}}\ndata: {train: t}\nbatch: {seq_len: 128}\n"
                     "parallel: {cp: 8}\n"),
            "`parallel.cp` at job.yaml:4:16 = 8 must divide model.create.heads = 4 and kv_heads = 4 with cp_mode "
            "ulysses (it splits heads); use cp_mode ring");
  EXPECT_EQ(error_of("model: {create: {heads: 4, kv_heads: 3}}\ndata: {train: t}\n"),
            "`model.create.kv_heads` at job.yaml:1:38 = 3 must divide heads = 4");
  EXPECT_EQ(error_of("model: {create: {hidden: 60}}\ndata: {train: t}\n"),
            "`model.create.hidden` at job.yaml:1:26 = 60 must be a multiple of 2 * heads = 8 (head_dim must be "
            "even for RoPE); change hidden or heads");
  EXPECT_EQ(error_of("model: {create: {vocab: 100}}\ndata: {train: t, format: text}\n"),
            "`model.create.vocab` at job.yaml:1:25 = 100 is too small for data.format text (byte-level: 256 "
            "bytes + BOS + EOS); set vocab >= 258");
  EXPECT_EQ(error_of("model: {create: {}}\ndata: {train: t}\nbatch: {seq_len: 1024}\n"),
            "`batch.seq_len` at job.yaml:3:18 = 1024 exceeds the model's context 256 (model.create.max_position); "
            "raise max_position or use model.rope_scaling");
  // rope scaling extends the context: 256 * 4 covers 1024.
  EXPECT_EQ(parse_job_spec("model: {create: {}, rope_scaling: {type: linear, factor: 4}}\ndata: {train: t}\n"
                           "batch: {seq_len: 1024}\n", "job.yaml").batch().seq_len(), 1024);
  EXPECT_EQ(error_of("model:\n  rope_scaling: {type: linear, factor: 2}\ndata: {train: t}\n"),
            "`model` at job.yaml:2:3 needs one of `path` (a HF directory: config.json + *.safetensors) or `create` "
            "(a new model, e.g. `create: {preset: tiny}`)");
  EXPECT_EQ(error_of("data: {train: t}\n"),
            "`model` is missing in job.yaml; add `model: {path: HF_DIR}` or `model: {create: {preset: tiny}}`");
  EXPECT_EQ(error_of("model: {path: /m}\n"),
            "`data.train` at job.yaml (default) is missing; give the training file (text or a .bin of tokens)");
  EXPECT_EQ(error_of("model: {path: /m}\ndata: {train: fineweb.bin}\n"),
            "`data.format` at job.yaml (default) is text but data.train fineweb.bin looks like a token file; "
            "set data.format to tokens_u16 or tokens_u32");
  EXPECT_EQ(error_of("model: {path: /m}\ndata: {train: shakespeare.txt, format: tokens_u32}\n"),
            "`data.format` at job.yaml:2:40 is tokens_u32 but data.train shakespeare.txt is not a .bin token file; "
            "set data.format to text for raw text");
  EXPECT_EQ(error_of(base + "run_dir: \"\"\n"),
            "`run_dir` at job.yaml:6:10 is empty; give the directory for checkpoints and metrics");
}

TEST(job_spec, overrides_replace_keys_and_name_the_set_in_errors) {
  auto s = parse_job_spec(base, "job.yaml", {"batch.seq_len=512", "optimizer.betas=[0.8, 0.9]", "parallel={dp: 2}"});
  EXPECT_EQ(s.batch().seq_len(), 512);
  EXPECT_EQ(s.optimizer().betas(0), 0.8);
  EXPECT_EQ(s.optimizer().betas(1), 0.9);
  EXPECT_EQ(s.parallel().dp(), 2);
  EXPECT_EQ(s.batch().global_batch(), 2);
  EXPECT_EQ(s.data().train(), "train.bin");  // untouched keys stay
  // An empty file plus overrides; a oneof member replaces the other one.
  s = parse_job_spec("", "job.yaml", {"model.path=/m", "data.train=t.txt"});
  EXPECT_EQ(s.model().path(), "/m");
  s = parse_job_spec("model:\n  create: {hidden: 128}\ndata: {train: t.txt}\n", "job.yaml", {"model.path=/ckpt/final"});
  ASSERT_TRUE(s.model().has_path());
  EXPECT_EQ(s.model().path(), "/ckpt/final");

  auto err = [](const std::string& o) {
    try {
      parse_job_spec(base, "job.yaml", {o});
    } catch (const error& e) {
      return e.message();
    }
    ADD_FAILURE() << "no error for --set " << o;
    return std::string();
  };
  EXPECT_EQ(err("batch.seq_len=abc"), "`batch.seq_len` at --set batch.seq_len=abc must be an integer, got 'abc'");
  EXPECT_EQ(err("batch.seq_len=0"), "`batch.seq_len` at --set batch.seq_len=0 must be positive, got 0");
  EXPECT_EQ(err("optimizer={lr: -1}"), "`optimizer.lr` at --set optimizer={lr: -1} must be positive, got -1");
  EXPECT_EQ(err("optimizer.warmup=3"),
            "unknown key `optimizer.warmup` at --set optimizer.warmup=3; did you mean `warmup_steps`? (`optimizer` "
            "takes: lr, min_lr, warmup_steps, betas, eps, weight_decay, grad_clip)");
  EXPECT_EQ(err("seq_len"), "--set seq_len: expected KEY=VALUE with a dotted key, e.g. --set optimizer.lr=1e-3");
  EXPECT_EQ(err("data.train.x=1"), "--set data.train.x=1: `data.train` is a scalar, not a mapping with key `x`");
  EXPECT_EQ(err("batch..seq_len=1"), "--set batch..seq_len=1: `batch..seq_len` has an empty key part");
}

TEST(job_spec, yaml_syntax_and_files) {
  EXPECT_HAS(error_of("model: {path: /m\ndata: [\n", errc::format), "job.yaml:");
  EXPECT_HAS(error_of("model: {path: /m\ndata: [\n", errc::format), "is not valid YAML");
  try {
    load_job_spec("/nonexistent/dir/job.yaml");
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_EQ(e.message(), "job file /nonexistent/dir/job.yaml not found");
  }
}

TEST(job_spec, example_job_parses) {
  const std::string path = std::string(TROUPE_FIXTURES_DIR) + "/../../examples/finetune_long_context/job.yaml";
  const job::JobSpec s = load_job_spec(path);
  ASSERT_TRUE(s.model().has_create());
  EXPECT_EQ(s.model().create().hidden(), 64);
  EXPECT_EQ(s.model().create().max_position(), 128);
  EXPECT_EQ(s.data().train(), "examples/data/tinyshakespeare.txt");
  EXPECT_EQ(s.data().format(), job::Data::TEXT);
  EXPECT_EQ(s.batch().seq_len(), 128);
  EXPECT_EQ(s.batch().grad_accum(), 2);
  EXPECT_EQ(s.parallel().dp(), 1);
  EXPECT_EQ(job_world_size(s), 1);
  EXPECT_EQ(s.checkpoint().dir(), "runs/finetune_long_context/stage1/checkpoints");
  EXPECT_TRUE(same(parse_job_spec(describe(s), "described.yaml"), s));
}

#else  // no yaml-cpp in this build

TEST(job_spec, parsing_without_yaml_cpp_is_unsupported) {
  try {
    parse_job_spec(base, "job.yaml");
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::unsupported);
    EXPECT_HAS(e.message(), "yaml-cpp");
  }
}

#endif

TEST(job_spec, validate_a_spec_built_in_code) {
  job::JobSpec s = job_spec_defaults();
  s.mutable_model()->set_path("/m");
  s.mutable_data()->set_train("t.bin");
  s.mutable_data()->set_format(job::Data::TOKENS_U32);
  s.mutable_batch()->set_micro_batch(2);
  s.mutable_parallel()->set_dp(4);
  validate_job_spec(s);
  EXPECT_EQ(s.batch().global_batch(), 8);
  EXPECT_EQ(s.batch().grad_accum(), 1);
  EXPECT_EQ(job_world_size(s), 4);
  s.mutable_parallel()->set_dp(2);  // global and accum now both set and inconsistent
  try {
    validate_job_spec(s, "cli");
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_EQ(e.message(), "`batch.global_batch` at cli (default) = 8 differs from batch.micro_batch * "
                           "batch.grad_accum * parallel.dp = 2 * 1 * 2 = 4; give only one of global_batch and "
                           "grad_accum");
  }
}
