// parallel/train/trainer.h — one rank's part of a training job: micro batches with gradient
// accumulation, data parallel (bucketed all-reduce overlapped with backward), context
// parallel (the decoder's Ulysses / ring attention), clipping, AdamW with warmup + cosine,
// validation, checkpoints and exact resume.
//
//   train_comms comms{.rank = r, .world_size = P, .grads = world.get(), .cp = cp_group.get()};
//   auto t = make_trainer(spec, comms, /*resume=*/"");          // model + data from the spec
//   while (t->steps_done() < spec.train().max_steps()) {
//     step_stats s = t->step();                                 // one optimizer step
//     if (...) double val = t->evaluate();
//   }
//   t->save_checkpoint();                                       // rank 0 writes; others return ""
//
// Rank layout: rank = dp_rank * cp + cp_rank. The cp ranks of one dp rank read the same
// sequences and each takes its contiguous slice of seq_len / cp tokens.
//
// Invariants:
//   1. Every rank's gradient is d(sum of its token losses) / (global_batch * seq_len); the
//      sum over all dp * cp ranks (grad_sync, on `grads`) is exactly the gradient of the
//      global batch's mean loss, whatever dp, cp and grad_accum are. The reported loss is the
//      same mean, summed over ranks, identical on every rank.
//   2. Only the last micro batch of a step reduces gradients (DDP's no_sync for the others),
//      bucket by bucket while its backward runs.
//   3. The state that makes a step is weights, AdamW moments and step count, and the data
//      position (the shuffle is a pure function of data.seed, epoch and index). state()
//      holds all of it but the tensors; restore() from a checkpoint of the same job
//      continues bitwise as the uninterrupted run would (same ranks, CPU, same threads).
//   4. Model sources: model.create (random init from `seed`) or model.path (a HF dir, or a
//      troupe checkpoint dir: the weights only); model.rope_scaling of another type than
//      none replaces the RoPE settings and sets max_position_embeddings to seq_len's need.
//   5. Communicator errors (a dead peer: errc::io; a teardown: errc::aborted) propagate out
//      of step() / evaluate(); nothing is written after a failed step.
//   6. Host placement (runtime::job_host_placement non-empty): the groups of ALGORITHMS.md "CXL-aware
//      host allocation" with this job's sizes — AdamW momentum and variance, master grads and master
//      weights (4 bytes per parameter each: fp32 training keeps no separate compute-precision copies,
//      so compute_weights and compute_grads are 0 bytes), activations = the MEMO host bytes of the
//      memory plan (0 without memo) — are placed (parallel/cxl/placement.h) on memory.tiers (or the
//      discovered tiers) within memory.local_dram_budget; the four tensor sets are re-homed into
//      their groups' tier memory before grad_sync is built (parallel/cxl/tiered_state.h, values
//      unchanged) and MEMO's host buffers follow the activations group. Steps are bitwise those of
//      the same job without placement.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "parallel/cp/context_parallel.h"
#include "parallel/data/packed_dataset.h"
#include "parallel/ep/ep_runner.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "parallel/train/grad_sync.h"
#include "parallel/train/optimizer.h"
#include "runtime/communicator.h"
#include "runtime/proto/job.pb.h"
#include "parallel/memo/arena.h"
#include "parallel/memo/memory_plan.h"
#include "parallel/memo/swap.h"

namespace troupe::parallel::cxl {
struct placement_plan;
class tiered_group_memory;
}  // namespace troupe::parallel::cxl

namespace troupe::parallel {

struct train_comms {
  int rank = 0;        // among the dp * cp ranks of the job
  int world_size = 1;  // dp * cp
  runtime::communicator* grads = nullptr;  // all ranks; used only by grad_sync's thread
  runtime::communicator* cp = nullptr;     // this rank's context-parallel group (cp ranks), or nullptr when cp = 1
  // parallel.ep > 1: the expert-parallel group (all ranks) for the MoE layers' token exchange, and
  // optionally a second one over the same ranks on which borrowed expert weights travel meanwhile.
  runtime::communicator* ep = nullptr;
  runtime::communicator* ep_weights = nullptr;
};

// Where a rank's micro batches come from: full sequences (micro_batch, seq_len).
class batch_source {
 public:
  virtual ~batch_source() = default;
  virtual void next(int32_t* inputs, int32_t* targets) = 0;
  virtual nlohmann::json position() const = 0;
  virtual void restore(const nlohmann::json& position) = 0;
};

// A packed_dataset's batch_iterator as a batch_source (position = {"epoch", "index"}).
class dataset_source : public batch_source {
 public:
  dataset_source(packed_dataset ds, data_split split, batch_layout layout, uint64_t seed, bool shuffle);
  void next(int32_t* inputs, int32_t* targets) override;
  nlohmann::json position() const override;
  void restore(const nlohmann::json& position) override;

 private:
  packed_dataset ds_;
  data_split split_;
  batch_layout layout_;
  uint64_t seed_;
  bool shuffle_;
  batch_iterator it_;
};

struct step_stats {
  int64_t step = 0;          // optimizer steps done after this one (1 after the first)
  double loss = 0;           // the global batch's mean token loss
  double grad_norm = 0;      // before clipping
  double lr = 0;
  int64_t tokens = 0;        // tokens of the global batch
  double seconds = 0;        // wall time of the step on this rank
  double exposed_comm_s = 0; // of which waiting for the gradient all-reduce
};

class trainer {
 public:
  // train: this rank's micro batches (its dp slice); val may be null (evaluate() then throws).
  trainer(job::JobSpec spec, train_comms comms, model_weights weights, std::unique_ptr<batch_source> train,
          std::unique_ptr<batch_source> val);
  ~trainer();

  step_stats step();
  // Mean validation token loss over train.eval_batches micro batches per dp rank, from the
  // start of the validation split every time (so evaluations are comparable).
  double evaluate();

  int64_t steps_done() const { return opt_.steps(); }
  const job::JobSpec& spec() const { return spec_; }
  const train_comms& comms() const { return comms_; }
  int dp_rank() const { return comms_.rank / cp_size(); }
  int cp_rank() const { return comms_.rank % cp_size(); }
  int cp_size() const { return static_cast<int>(spec_.parallel().cp()); }
  model_weights& weights() { return weights_; }
  adamw& optimizer() { return opt_; }
  const grad_sync& sync() const { return *sync_; }
  double lr_at(int64_t step) const { return sched_.at(step); }
  // Bytes of activations the last forward kept for backward on this rank.
  size_t activation_bytes() const;
  // memory.device_budget / memory.memo: the plan made at construction (nullptr when neither is set),
  // the step arena (nullptr without a budget) and the swap engine (nullptr with memo off).
  const memo::memory_report* memory_plan() const { return memory_.get(); }
  const memo::step_arena* arena() const { return arena_.get(); }
  const memo::memo_swap* memo() const { return swap_.get(); }
  // Host placement through the memory tiers (invariant 6): the plan (nullptr when the job's host
  // memory is not placed: no memory.tiers and no memory.placement) and the groups' memory.
  const cxl::placement_plan* placement() const;
  const cxl::tiered_group_memory* tiered_memory() const { return tiered_.get(); }
  // parallel.ep > 1: the MoE layers' expert-parallel runner (loads, plans, placement); else nullptr.
  ep::ep_moe_runner* expert_parallel() { return ep_.get(); }
  // Layer `layer`'s expert tensors this rank holds or will hold — weights, gradients, AdamW m and v
  // — for ep_migrate (a placement change between steps).
  std::vector<ep::ep_expert_tensors> expert_sets(int64_t layer);
  // Collective between steps (every rank, same arguments): moves the layer's experts to `to` over the
  // expert-parallel communicator and runs the layer with it from the next step. -> bytes sent here.
  size_t migrate_experts(int64_t layer, const ep::ep_placement& to);
  // After the caller moved expert_sets(layer) itself (actors::switch_expert_placement).
  void set_expert_placement(int64_t layer, const ep::ep_placement& p);

  // Everything of the run's state but the tensors (trainer_state.json).
  nlohmann::json state() const;
  // Continues from a checkpoint directory (or a checkpoint root: its latest).
  void resume(const std::string& path);
  // Rank 0 writes checkpoint.dir/step-N (atomic, keeps checkpoint.keep); other ranks return "".
  std::string save_checkpoint();
  // The whole parameter set: weights() itself, or under parallel.ep (a shard) gathered from every
  // rank — collective then (all ranks call it).
  model_weights gathered_weights();
  // A reduction among all ranks on the gradient communicator's thread (metrics).
  void all_reduce(runtime::tensor& t, runtime::reduce_op op) { sync_->all_reduce(t, op); }

 private:
  void slice_for_cp(const std::vector<int32_t>& full, std::vector<int32_t>& mine) const;

  job::JobSpec spec_;
  train_comms comms_;
  model_weights weights_;
  model_weights grads_;
  std::unique_ptr<batch_source> train_, val_;
  lr_schedule sched_;
  adamw opt_;
  decoder dec_;
  context_parallel cp_;
  std::unique_ptr<grad_sync> sync_;
  std::unique_ptr<memo::memory_report> memory_;
  std::unique_ptr<memo::step_arena> arena_;
  std::unique_ptr<memo::memo_swap> swap_;
  std::unique_ptr<cxl::tiered_group_memory> tiered_;
  std::unique_ptr<ep::ep_moe_runner> ep_;
  int64_t tokens_seen_ = 0;
};

// The model the spec asks for (invariant 4), identical on every rank.
model_weights make_model(const job::JobSpec& spec);
// The packed dataset of the spec's data section (text: byte tokens; tokens_u16/u32: llm.c
// with a header, or a bare nanoGPT array), checked against the model's vocabulary.
packed_dataset make_dataset(const job::JobSpec& spec, int64_t vocab_size);
// Model, data (this rank's dp slice), and — when resume is a non-empty path — the state of a checkpoint.
std::unique_ptr<trainer> make_trainer(const job::JobSpec& spec, train_comms comms, const std::string& resume = "");

// Model FLOPs per token of one training step (forward + backward), the PaLM formula:
// 6 * (parameters without the embedding) + 12 * layers * heads * head_dim * seq_len.
double train_flops_per_token(const runtime::model_config& c, int64_t params, int64_t seq_len);

}  // namespace troupe::parallel
