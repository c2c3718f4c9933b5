// elastic/scale/dp_group.h — a data-parallel-attention serving group, the DeepSeek / SGLang layout
// that ElasticMoE scales: every rank runs its own engine over its own requests, KV cache and prefix
// cache; the MoE layers exchange tokens across every rank each iteration (the decoders'
// parallel/ep/ep_serve_runner.h in data_parallel layout, LLEP); dense weights are replicated. Rank 0
// holds the HTTP front and a dispatcher (dp_dispatch.h) that sends each request to a rank; the ranks
// iterate in lockstep, driven by rank 0.
//
//   // every rank: its decoder with ep_serve_runner(ctx, ep_serve_layout::data_parallel), then
//   const int64_t blocks = agree_num_blocks(comm, mine);            // the group's minimum
//   local_executor ex(dec, blocks, block_size);
//   engine eng(ex, tok, opts);
//   // rank 0
//   dp_leader lead(eng, comm, make_dp_dispatch("least_kv_prefix", P, block_size));
//   serve_scheduler_client sched(system, lead);                     // steps lead; HTTP submits to it
//   // ranks 1..P-1
//   dp_follow(eng, comm);                                            // until rank 0 ends the group
//
// Invariants:
//   1. One group iteration: rank 0 broadcasts a step (serve.proto DpStep: the requests and aborts it
//      dispatched since the last one, each naming its rank); every rank queues its own into its engine
//      and runs engine::step_or_idle, so every rank calls every MoE layer's collectives once per
//      iteration, with no tokens if it has none; then every other rank sends rank 0 a DpReport (its
//      requests' events of the iteration and its load). Rank 0's own requests go to its engine directly.
//   2. Rank 0 iterates while any rank has work it knows of (its engine's, requests dispatched and not
//      finished, aborts to deliver); otherwise nothing is sent and the others wait on the broadcast,
//      hearing a keepalive every keepalive_ms: an idle group does not spin.
//   3. submit() checks a request with rank 0's engine (every rank serves the same model with the same
//      KV block count) and throws what engine::submit throws — engine_busy when the group holds
//      max_waiting sequences per rank already — then the dispatcher picks its rank (another one
//      when rank 0's own queue is full). A remote request's
//      events reach its callback on rank 0's stepping thread, in order, after the iteration that
//      made them; every sample gets exactly one finished event.
//   4. Greedy output equals generate_greedy on the prompt whichever rank serves it: the MoE layer is
//      the single-rank layer on the ranks' rows concatenated (ep_layer.h invariant 2), attention is
//      the rank's own.
//   5. shutdown() ends rank 0's requests and the remote ones with "abort" and the group with an end
//      header (the others' dp_follow returns); later submits are refused. The engines run with
//      engine_options::group_member: a batch a rank's model refuses ends with "error" and the rank
//      still joins the iteration's collectives; a failure inside a step, or of the communicator,
//      breaks the group: the iteration throws, the communicator is aborted (the other ranks fail
//      at once), every remote request ends with "error", broken() is true and later steps throw
//      (errc::aborted).
//   6. metrics_text(): TTFT / TPOT histograms of every rank's engine summed (a remote request's TTFT
//      counts from its arrival at rank 0), queue and KV figures summed, and per rank.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "elastic/engine/engine.h"
#include "elastic/engine/executor.h"
#include "elastic/scale/dp_dispatch.h"
#include "runtime/communicator.h"
#include "runtime/proto/serve.pb.h"

namespace troupe::elastic {

class dp_leader final : public step_driver {
 public:
  dp_leader(engine& local, runtime::communicator& comm, std::unique_ptr<dp_dispatch_policy> policy,
            group_hooks hooks = {});
  ~dp_leader() override;
  dp_leader(const dp_leader&) = delete;
  dp_leader& operator=(const dp_leader&) = delete;

  void submit(engine_request r) override;       // thread-safe
  void abort(const std::string& id) override;   // thread-safe; unknown ids are ignored
  bool step() override;
  void keepalive() override;
  void shutdown() override;
  bool inbox_pending() const override;
  int64_t keepalive_ms() const override { return eng_.keepalive_ms(); }

  int ranks() const { return comm_.size(); }
  bool broken() const;  // thread-safe
  std::string broken_reason() const;
  std::vector<dp_rank_load> loads() const;       // as last reported (rank 0: now)
  std::vector<int64_t> dispatched() const;       // requests sent to each rank so far
  std::string metrics_text() const;              // invariant 6, then the experts' rows
  const dp_dispatch_policy& policy() const { return *policy_; }

 private:
  struct request_state {
    int rank = 0;
    int64_t n = 1;
    std::vector<bool> done;  // per sample
    std::function<void(const engine_event&)> on_event;
  };
  void deliver(const std::string& id, const engine_event& e);
  void record_dispatch(int rank, const std::vector<int32_t>& prompt, int64_t blocks);
  void fail_remote(const std::string& why, const std::string& reason);
  void send_header(int64_t kind, int64_t bytes);
  void finish();

  engine& eng_;
  runtime::communicator& comm_;
  std::unique_ptr<dp_dispatch_policy> policy_;
  group_hooks hooks_;
  std::atomic<int64_t> steps_{0};
  bool finished_ = false;

  mutable std::mutex mu_;
  serve::DpStep next_;                             // what the next iteration delivers
  std::map<std::string, request_state> requests_;  // every request of the group not finished yet
  std::map<std::string, std::chrono::steady_clock::time_point> arrivals_;  // remote, until sent
  int64_t samples_ = 0;                            // their unfinished samples (the group's queue bound)
  bool shut_ = false;
  std::vector<dp_rank_load> loads_;
  std::vector<int64_t> pending_blocks_, in_step_blocks_;  // dispatched to a rank, not yet in its report
  std::vector<int64_t> dispatched_;
  std::vector<serve::DpReport> reports_;           // the last report of each rank (their counters)
  std::string broken_;
};

// Ranks 1..P-1 of the group: run every iteration rank 0 starts (invariant 1) until it ends the group;
// returns the iterations run. Requests that this rank's engine refuses end with "error".
int64_t dp_follow(engine& local, runtime::communicator& comm, const group_hooks& hooks = {});

}  // namespace troupe::elastic
