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
//   // growing and shrinking while serving (invariant 7): a dp_elastic on every rank, then
//   lead.request_scale(4);                                           // from the admin endpoint
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
//      counts from its arrival at rank 0), queue and KV figures summed, and per rank; the scale
//      events and their phases.
//   7. Scaling (with a dp_elastic whose pool_ranks > 0): request_scale(M) is checked at once (a clear
//      dp_scale_refused and nothing changes: M outside [1, pool_ranks], equal to the size, a change
//      already under way, a model the check refuses) and carried out by rank 0's stepping thread in
//      two iteration boundaries. At the first, rank 0 broadcasts a DpScale (prepare) to the group and
//      announces it to the joining ranks; every rank of the change calls dp_elastic::prepare and the
//      group goes on serving on the old layout while the weights move. At the first boundary after
//      rank 0's moves are ready, rank 0 broadcasts the commit, every rank calls dp_elastic::commit,
//      and the group goes on with ranks [0, M); a rank keeps its number. From the request on, ranks
//      that will leave take no new requests. A rank that leaves returns from dp_follow (left = true)
//      after its commit; its unfinished samples go on elsewhere from the tokens their clients were
//      sent (DpRequest resumed, engine.h invariant 10): no event is lost or repeated, greedy output
//      is unchanged. Requests queued for it and not yet sent are dispatched again. A failure inside a
//      change breaks the group as invariant 5 says.
//   8. A member lost (dp_elastic::lost names a pool rank of the group; the worker aborted the group's
//      communicators) is survived: the iteration that failed is undone on every survivor (engine.h
//      invariant 11) or, where it completed, kept; rank 0 sends each survivor a recovery DpScale over
//      dp_elastic::control and gets back a DpResync (the last iteration it took in and the reports
//      rank 0 may lack), every survivor calls dp_elastic::recover, and the group goes on with the
//      survivors renumbered in order. Reports of the failed iteration reach their clients once; the
//      requests it carried are sent again to the survivors that did not take them in; the lost
//      ranks' samples resume elsewhere from the tokens their clients were sent (as in invariant 7);
//      a change asked for and not begun is dropped (state "failed"). The retry of the failed
//      iteration counts as a new one. A loss while a change's weights move, of rank 0, or of a rank
//      during a recovery (after the recovery channel's timeout) breaks the group as invariant 5 says,
//      and rank 0 tells the survivors waiting for a plan that none will come. A step that fails with
//      no loss named within loss_wait_ms breaks it too.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <stdexcept>
#include <vector>

#include "elastic/engine/engine.h"
#include "elastic/engine/executor.h"
#include "elastic/scale/dp_dispatch.h"
#include "runtime/communicator.h"
#include "runtime/proto/serve.pb.h"

namespace troupe::elastic {

// The side of a change of size (invariant 7) that belongs to whoever owns the ranks' models and
// communicators (elastic/scale/dp_member.h in a server, threads in the tests).
struct dp_elastic {
  int pool_ranks = 0;  // ranks able to serve: scale targets lie in [1, pool_ranks]; 0 = a fixed group
  // Every rank of the change, old and new: prepare starts moving the weights and making the new
  // group's communicators beside serving; commit waits for that, switches and returns the new
  // group's communicator (null on a rank that leaves). Rank 0 calls each after telling the others.
  std::function<void(const serve::DpScale&)> prepare;
  std::function<runtime::communicator*(const serve::DpScale&)> commit;
  // Rank 0: its moves are done, and so every rank's (dp_member.h invariant 3).
  std::function<bool()> ready;
  // This rank: why its moves failed, "" while they run or when they succeeded. A rank whose moves
  // failed leaves the group at once (it breaks: invariant 5) rather than wait for the commit.
  std::function<std::string()> move_error;
  // Rank 0: tells the joining ranks, which wait outside the group.
  std::function<void(const serve::DpScale&)> announce;
  // Rank 0: throws errc::invalid_argument when the model cannot run on that many ranks.
  std::function<void(int)> check;
  // Rank 0, once the group ended: tells the ranks outside it.
  std::function<void()> end;
  // Rank 0: the members and expert placement of a change to `target` ranks, and of a recovery
  // without the `lost` pool ranks (dp_member.h invariants 1, 2).
  std::function<serve::DpScale(int target)> plan;
  std::function<serve::DpScale(const std::vector<int>& lost)> plan_recovery;
  // Every survivor of a loss (invariant 8): rebuilds the group as the plan says and returns its new
  // serving communicator.
  std::function<runtime::communicator*(const serve::DpScale&)> recover;
  std::function<std::vector<int>()> lost;     // pool ranks lost so far (any thread)
  std::function<std::vector<int>()> members;  // the group's pool ranks, group order (stepping thread)
  std::function<int()> pool_alive;            // processes of the pool still alive
  runtime::communicator* control = nullptr;   // rank = pool rank: a recovery's messages (bounded waits)
  std::function<bool()> moving;               // this rank's weights of a change are moving
  // dp_member.h invariant 11: the pool ranks whose loss concerns this rank (its group's and, while a
  // change is prepared, the change's); give up the prepared change; leave the group for standby (a
  // joining rank whose change rank 0 abandoned after it switched).
  std::function<std::vector<int>()> watched;
  std::function<void()> abandon;
  std::function<void()> to_standby;
};

// A joining rank whose change failed: whether a rank the change concerns was lost (waiting a while
// for the notice), and then rank 0's word that it abandoned the change (errc::aborted otherwise).
bool dp_saw_loss(const dp_elastic& el);
void dp_await_abandoned(const dp_elastic& el);

// request_scale's refusal; status() is the HTTP status that says why (400, 409, 501).
class dp_scale_refused : public std::runtime_error {
 public:
  dp_scale_refused(int status, const std::string& what) : std::runtime_error(what), status_(status) {}
  int status() const { return status_; }

 private:
  int status_;
};

struct dp_scale_status {
  std::string state = "idle";  // idle | pending (asked) | moving (weights moving beside serving) | done | failed
  int64_t epoch = 1;           // layouts so far
  int ranks = 1;               // serving now
  int target = 1;              // of the change pending or last done
  int pool_ranks = 0;          // processes of the pool alive (serving or standby)
  int64_t scale_ups = 0, scale_downs = 0;
  int64_t moved_samples = 0;   // samples resumed on another rank, all changes
  int64_t recoveries = 0;      // losses survived (invariant 8)
  int64_t abandoned = 0;       // changes given up because a rank of theirs was lost (dp_member.h invariant 11)
  int64_t lost_ranks = 0;      // serving ranks lost
  double last_recovery_seconds = 0;  // the failed iteration's start -> the group rebuilt
  double last_total_seconds = 0;   // request -> the first iteration on the new layout
  double last_wait_seconds = 0;    // request -> the iteration boundary that starts it
  double last_move_seconds = 0;    // weights moved and communicators made, beside serving
  double last_switch_seconds = 0;  // the commit: the only time iterations pause
  std::string error;
};

using clk_time = std::chrono::steady_clock::time_point;

class dp_leader final : public step_driver {
 public:
  dp_leader(engine& local, runtime::communicator& comm, std::unique_ptr<dp_dispatch_policy> policy,
            group_hooks hooks = {}, dp_elastic elastic = {});
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

  int ranks() const;  // thread-safe
  // Invariant 7; thread-safe. Throws dp_scale_refused.
  void request_scale(int ranks);
  dp_scale_status scale_status() const;  // thread-safe
  bool broken() const;  // thread-safe
  std::string broken_reason() const;
  std::vector<dp_rank_load> loads() const;       // as last reported (rank 0: now)
  std::vector<int64_t> dispatched() const;       // requests sent to each rank so far
  std::string metrics_text() const;              // invariant 6, then the experts' rows
  // The group's gauges and latency histograms, every rank summed (what metrics_text shows).
  struct summary_t {
    serving_gauges gauges;
    latency_histogram ttft{serving_latency_bounds()}, tpot{serving_latency_bounds()};
  };
  summary_t summary() const;
  const dp_dispatch_policy& policy() const { return *policy_; }

 private:
  struct request_state {
    std::vector<int> rank;   // per sample: the rank serving it
    int64_t n = 1;
    std::vector<bool> done;  // per sample
    std::function<void(const engine_event&)> on_event;
    serve::DpRequest spec;   // a remote request as sent (to move its samples)
    std::vector<std::vector<int32_t>> sent;  // per sample: the token ids delivered so far
    std::vector<double> cumulative;          // per sample: the last cumulative logprob delivered
    std::vector<std::chrono::steady_clock::time_point> last_sent;  // per sample: when its last token went out
    std::chrono::steady_clock::time_point arrival;                 // at rank 0 (a moved sample's TTFT starts here)
    bool prompt_logprobs_sent = false;
    bool remote_unfinished() const;
  };
  void deliver(const std::string& id, const engine_event& e);
  void begin_scale(int target);
  void commit_scale();
  bool loss_pending() const;
  bool await_loss() const;
  void recover();
  void regroup_locked(const std::vector<int>& old_to_new, int ranks,
                      std::vector<std::pair<std::string, engine_event>>& aborted);
  void retire_locked(const serve::DpReport& rep);
  void take_report_locked(int rank, serve::DpReport rep);
  void place(serve::DpRequest q, request_state& s, std::vector<int> samples);
  void fail_group(const std::exception& e);
  void record_dispatch(int rank, const std::vector<int32_t>& prompt, int64_t blocks);
  void fail_remote(const std::string& why, const std::string& reason);
  void send_header(int64_t kind, int64_t bytes);
  void finish();

  engine& eng_;
  runtime::communicator* comm_;
  dp_elastic elastic_;
  std::map<std::string, std::shared_ptr<const json_grammar>> grammars_;  // of moved samples for rank 0
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
  dp_scale_status scale_;
  std::chrono::steady_clock::time_point scale_requested_;
  serve::DpScale plan_;  // the change under way (state "moving"): stepping thread only
  std::chrono::steady_clock::time_point last_header_{};  // the group last heard from rank 0
  serve::DpReport retired_;  // the counters of ranks that left (metrics stay cumulative)
  std::vector<std::pair<std::string, engine_event>> failed_moves_;  // ended after the commit's lock
  serve::DpStep inflight_;      // the iteration being run (stepping thread): a recovery sends it again
  clk_time step_started_{};     // when it began
};

// Ranks 1..P-1 of the group: run every iteration rank 0 starts (invariant 1) until it ends the group
// or this rank leaves it (invariant 7: `comm` is replaced by each regroup's). Requests that this
// rank's engine refuses end with "error".
struct dp_follow_result {
  int64_t steps = 0;  // iterations run
  bool left = false;  // the group shrank without this rank (else it ended)
};
dp_follow_result dp_follow(engine& local, runtime::communicator& comm, const group_hooks& hooks = {},
                           const dp_elastic& elastic = {});

}  // namespace troupe::elastic
