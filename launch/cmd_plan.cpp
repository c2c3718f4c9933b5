// `troupe plan job.yaml [--set k=v] [--find-max-seq] [--max-seq N] [--json]`: the memory plan one
// rank of the job would run with (parallel/memo/memory_plan.h): α, the level-1 and level-2 peaks,
// host bytes per tier, the predicted step time and the fragmentation of the planned arena against
// a caching allocator replaying the same trace, and where every host group goes across the memory
// tiers (parallel/cxl/placement.h; with memory.tiers or memory.placement). --find-max-seq searches
// the largest seq_len that fits memory.device_budget with the job's settings, with MEMO at α = 1,
// and with no offload.
//
//   troupe plan examples/finetune_long_context/memo_budget.yaml
//   troupe plan job.yaml --set memory.device_budget=64MiB --find-max-seq
//
// The model comes from the spec (model.create or model.path; data is not read). With
// parallel.cp > 1 the plan is for one rank's seq_len / cp tokens, recorded without the
// context-parallel communication buffers (the trainer records with them).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "parallel/cxl/tiered_state.h"
#include "parallel/memo/memory_plan.h"
#include "parallel/train/trainer.h"
#include "runtime/error.h"
#include "runtime/job_spec.h"

namespace troupe::launch {

namespace {

struct plan_args {
  std::string job;
  std::vector<std::string> sets;
  bool find_max_seq = false;
  int64_t max_seq = 0;
  bool json = false;
};

nlohmann::json to_json(const parallel::memo::memory_report& r) {
  return {{"micro_batch", r.batch},
          {"seq_len_per_rank", r.seq_len},
          {"memo", r.settings.memo},
          {"alpha", r.alpha},
          {"alpha_source", r.alpha_source},
          {"layer_forward_s", r.layer_forward_s},
          {"copy_gbps", r.copy_gbps},
          {"level1_forward_peak", r.plan.level1_forward_peak},
          {"level1_backward_peak", r.plan.level1_backward_peak},
          {"level2_peak", r.plan.arena_bytes},
          {"bilevel", r.plan.bilevel},
          {"plan_method", r.plan.method},
          {"plan_solve_s", r.plan.solve_s},
          {"max_live", r.plan.max_live},
          {"persistent_bytes", r.persistent_bytes},
          {"device_bytes", r.device_bytes},
          {"device_budget", r.settings.device_budget},
          {"fits", r.fits},
          {"host_bytes", {{"dram", r.host_bytes}}},
          {"predicted_step_s", r.predicted_step_s},
          {"fragmentation", r.plan.fragmentation()},
          {"caching_reserved", r.caching.reserved_peak},
          {"caching_fragmentation", r.caching.fragmentation()},
          {"extrapolated", r.extrapolated}};
}

nlohmann::json to_json(const parallel::cxl::placement_plan& p, const std::vector<runtime::memory_tier>& tiers) {
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& g : p.groups) {
    nlohmann::json shares = nlohmann::json::array();
    for (const auto& s : g.shares) shares.push_back({{"tier", s.tier}, {"node", s.node}, {"bytes", s.bytes}});
    groups.push_back({{"name", g.name},
                      {"priority", g.priority},
                      {"bytes", g.bytes},
                      {"dram_bytes", g.dram_bytes},
                      {"cxl_bytes", g.cxl_bytes},
                      {"straddles", g.straddles},
                      {"tiers", g.tiers},
                      {"mode", g.where.how == runtime::placement::bind
                                   ? "bind"
                                   : (g.where.weights.empty() ? "interleave" : "weighted")},
                      {"nodes", g.where.nodes},
                      {"weights", g.where.weights},
                      {"shares", shares}});
  }
  nlohmann::json jt = nlohmann::json::array();
  for (const auto& t : tiers)
    jt.push_back({{"name", t.name},
                  {"kind", runtime::tier_kind_name(t.type)},
                  {"numa_nodes", t.numa_nodes},
                  {"capacity_bytes", t.capacity_bytes},
                  {"emulated", t.emulated},
                  {"emulated_gbps", t.emulated_gbps},
                  {"emulated_latency_ns", t.emulated_latency_ns}});
  return {{"policy", parallel::cxl::policy_name(p.policy)},
          {"local_dram_budget", p.local_dram_budget},
          {"dram_bytes", p.dram_bytes},
          {"cxl_bytes", p.cxl_bytes},
          {"groups", groups},
          {"tiers", jt}};
}

// Where every host group of the job goes (trainer.h invariant 6), as the trainer will place it.
std::string host_placement(const job::JobSpec& spec, const parallel::model_weights& w, int64_t activation_host_bytes,
                           nlohmann::json& j) {
  if (runtime::job_host_placement(spec).empty()) {
    j["host_placement"] = nullptr;
    return "host placement: off (the heap); declare memory.tiers or set memory.placement to place the host state "
           "on DRAM/CXL tiers\n";
  }
  const std::vector<runtime::memory_tier> tiers = runtime::tiers_from_spec(spec);
  const parallel::cxl::placement_plan p = parallel::cxl::place_job(spec, w, activation_host_bytes, tiers);
  j["host_placement"] = to_json(p, tiers);
  std::string text = parallel::cxl::describe(p);
  text += "  note: fp32 training keeps no separate compute-precision copies: compute_weights and compute_grads are "
          "0 bytes\n";
  for (const auto& t : tiers)
    text += fmt::format("  tier {:<10} {:<4} nodes {{{}}}  {:.2f} GiB{}\n", t.name, runtime::tier_kind_name(t.type),
                        fmt::join(t.numa_nodes, ","), static_cast<double>(t.capacity_bytes) / (1 << 30),
                        t.emulated ? fmt::format("  (emulated CXL: {} GB/s, +{} ns)", t.emulated_gbps,
                                                 t.emulated_latency_ns)
                                   : std::string());
  return text;
}

void run_plan(const plan_args& a) {
  using runtime::errc;
  const job::JobSpec spec = runtime::load_job_spec(a.job, a.sets);
  const parallel::model_weights w = parallel::make_model(spec);
  const int64_t cp = spec.parallel().cp(), B = spec.batch().micro_batch(), T = spec.batch().seq_len() / cp;
  parallel::memo::memory_settings s = parallel::memo::memory_settings_of(spec);
  s.cache_dir.clear();  // planning is not a run: no cache files
  const parallel::memo::memory_report r = parallel::memo::plan_memory(w, B, T, s);
  nlohmann::json j = to_json(r);
  std::string text = parallel::memo::describe(r);
  text += host_placement(spec, w, r.host_bytes, j);
  if (cp > 1)
    text += fmt::format("  note                 parallel.cp = {}: one rank's {} of {} tokens; the context-parallel "
                        "buffers are not in this trace\n",
                        cp, T, spec.batch().seq_len());
  if (a.find_max_seq) {
    TROUPE_CHECK(s.device_budget > 0, errc::invalid_argument,
                 "{}: --find-max-seq needs memory.device_budget (set it in the spec or with --set "
                 "memory.device_budget=8GiB)",
                 a.job);
    const int64_t t_max = a.max_seq > 0 ? a.max_seq / cp : w.config().max_position_embeddings / cp;
    TROUPE_CHECK(t_max >= 16, errc::invalid_argument, "{}: --max-seq {} leaves fewer than 16 tokens per rank", a.job,
                 a.max_seq);
    parallel::memo::memory_settings off = s, on = s;
    off.memo = false;
    on.memo = true;
    on.alpha = 1.0;
    const int64_t mine = parallel::memo::find_max_seq(w, B, s, t_max, 16);
    const int64_t none = parallel::memo::find_max_seq(w, B, off, t_max, 16);
    const int64_t memo = parallel::memo::find_max_seq(w, B, on, t_max, 16);
    text += fmt::format("largest seq_len under {} (micro_batch {}, searched up to {} per rank, multiples of 16):\n",
                        parallel::memo::format_bytes(s.device_budget), B, t_max);
    text += fmt::format("  these settings       {} per rank ({} with cp {})\n", mine, mine * cp, cp);
    text += fmt::format("  no offload           {} per rank\n", none);
    text += fmt::format("  MEMO, alpha 1        {} per rank\n", memo);
    j["max_seq_len"] = {{"settings", mine}, {"no_offload", none}, {"memo_alpha_1", memo}, {"searched_up_to", t_max}};
  }
  if (a.json)
    fmt::print("{}\n", j.dump(2));
  else
    fmt::print("{}", text);
}

}  // namespace

void register_plan(CLI::App& app) {
  auto args = std::make_shared<plan_args>();
  auto* cmd = app.add_subcommand(
      "plan", "Print a training job's memory plan (MEMO: alpha, arena peaks, host bytes, fragmentation)");
  cmd->add_option("JOB", args->job, "the job spec (YAML)")->required();
  cmd->add_option("--set", args->sets, "override a key: --set memory.device_budget=2GiB (repeatable)");
  cmd->add_flag("--find-max-seq", args->find_max_seq, "search the largest seq_len that fits memory.device_budget");
  cmd->add_option("--max-seq", args->max_seq, "upper end of the search (default: the model's max positions)");
  cmd->add_flag("--json", args->json, "print the plan as JSON");
  cmd->callback([args] { run_plan(*args); });
}

}  // namespace troupe::launch
