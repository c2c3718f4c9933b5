// elastic/engine/executor.h — where the serving engine's model step runs. The decoder (its weights,
// MoE layers through parallel/ep/ep_serve_runner.h) and the paged KV store sit behind one interface,
// so the engine (scheduling, KV blocks, sampling) is the same on one rank and on an expert-parallel
// group of worker ranks; scaling (ElasticMoE) changes what is behind it, not the engine.
//
//   local_executor ex(dec, num_blocks, block_size);           // this rank alone
//   engine eng(ex, tok, opts);
//
//   // a group of P ranks (the worker actors' communicator): rank 0 hosts the engine,
//   group_executor ex(dec, num_blocks, block_size, comm);     // rank 0: every step is sent to the others
//   follow_group(dec, num_blocks, block_size, comm);          // ranks 1..P-1: run them until rank 0 finishes
//
// Invariants:
//   1. execute() returns the logits (n_seqs, V) of each sequence's last new token, exactly as
//      parallel::forward_batch on this rank's store; a batch it refuses (bad input) throws before
//      anything is written (forward_batch.h invariant 5).
//   2. In a group every rank holds a replica of the KV store with the same number of blocks (the
//      group's minimum of what each rank's budget allows, agreed at construction; < 1 block fails
//      on every rank alike) and runs every batch rank 0 runs, in the same order, so the replicas
//      stay equal and the MoE layers' collectives pair up. Ranks > 0 compute no logits. Rank 0
//      checks a batch (check_forward_batch) before sending it: a refused batch never leaves rank 0
//      and the group goes on.
//   3. Rank 0 sends one header (kind, sequences, tokens, blocks) and one body per step over the
//      communicator, a header alone for keepalive(); finish() sends the end (once; the destructor
//      sends it too) and follow_group returns the number of steps it ran. A broken communicator
//      throws on every rank.
//   6. Hooks (group_hooks): after_step(k) runs on every rank after the k-th step; when rank 0's
//      want_sync() says so after a step, a sync header follows it and every rank runs sync() at
//      that point, before the next step, so sync may run collectives (a placement switch).
//   4. expert_loads(): the group's rows per expert per MoE layer since the start (ep_serve_runner.h
//      invariant 3), empty when the decoder has no ep_serve_runner (a dense model).
//   5. A failure after a step was sent (a communicator error, a rank gone) breaks the group: from
//      then on execute() and keepalive() throw at once (errc::aborted, with the first error) and
//      broken() is true, so the server stops instead of waiting on collectives that never pair;
//      a follower leaves follow_group with the error.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "parallel/model/decoder.h"
#include "parallel/model/forward_batch.h"
#include "parallel/model/paged_kv.h"
#include "runtime/communicator.h"

namespace troupe::elastic {

// What a group does between steps besides the model (launch/cmd_serve.cpp wires the supervisor's
// expert placement through these; elastic/ knows no actors). All optional.
struct group_hooks {
  std::function<void(int64_t step)> after_step;  // every rank, after step `step` (0, 1, ...) ran
  std::function<bool()> want_sync;                // rank 0, after each step: run `sync` on every rank now?
  std::function<void()> sync;                     // every rank at the same point (collectives allowed)
};

class model_executor {
 public:
  virtual ~model_executor() = default;
  virtual const runtime::model_config& config() const = 0;
  virtual int64_t num_blocks() const = 0;
  virtual int64_t block_size() const = 0;
  virtual int ranks() const { return 1; }
  virtual runtime::tensor execute(std::span<const parallel::forward_batch_seq> seqs) = 0;
  // Throws what execute() would throw for this batch's input, running nothing (forward_batch.h
  // invariant 5); nothing by default.
  virtual void check(std::span<const parallel::forward_batch_seq>) const {}
  virtual std::map<int64_t, std::vector<int64_t>> expert_loads() const { return {}; }
  // Max/mean rows per rank of the last step's expert-parallel plans (1 on one rank).
  virtual double expert_balance() const { return 1.0; }
  // While idle, now and then (the engine's thread): a group's other ranks hear from rank 0 so their
  // communicator's timeout never fires on a quiet server.
  virtual void keepalive() {}
  virtual void finish() {}
  // A data-parallel group's iteration with nothing scheduled on this rank: the MoE layers'
  // collectives with no tokens (parallel::forward_batch_idle). Nothing on one rank.
  virtual void idle_pass() {}
};

class local_executor : public model_executor {
 public:
  local_executor(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size);
  const runtime::model_config& config() const override { return dec_.config(); }
  int64_t num_blocks() const override { return store_.num_blocks(); }
  int64_t block_size() const override { return store_.block_size(); }
  runtime::tensor execute(std::span<const parallel::forward_batch_seq> seqs) override;
  std::map<int64_t, std::vector<int64_t>> expert_loads() const override;
  double expert_balance() const override;
  void idle_pass() override;
  void check(std::span<const parallel::forward_batch_seq> seqs) const override;

 protected:
  const parallel::decoder& dec_;
  parallel::paged_kv_store store_;
};

class group_executor final : public local_executor {
 public:
  // comm: the group (this rank is its rank 0); num_blocks: what this rank's budget allows.
  group_executor(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size, runtime::communicator& comm,
                 group_hooks hooks = {});
  ~group_executor() override;
  int ranks() const override { return comm_.size(); }
  runtime::tensor execute(std::span<const parallel::forward_batch_seq> seqs) override;
  void keepalive() override;
  void finish() override;
  bool broken() const;  // invariant 5; thread-safe
  std::string broken_reason() const;

 private:
  void send_or_break(runtime::tensor& t);
  runtime::communicator& comm_;
  group_hooks hooks_;
  int64_t steps_ = 0;
  bool finished_ = false;
  mutable std::mutex mu_;
  std::string broken_;  // the first failure after a step was sent; empty = whole
};

// Ranks 1..P-1 of a group: agree on the blocks, then run every batch rank 0 sends until it finishes.
int64_t follow_group(const parallel::decoder& dec, int64_t num_blocks, int64_t block_size,
                     runtime::communicator& comm, const group_hooks& hooks = {});

// The group's minimum of `mine` (every rank calls it at once).
int64_t agree_num_blocks(runtime::communicator& comm, int64_t mine);

}  // namespace troupe::elastic
