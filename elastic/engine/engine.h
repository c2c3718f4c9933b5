// elastic/engine/engine.h — one serving instance's engine: continuous batching over a paged KV
// cache with prefix caching (kv_blocks.h), chunked prefill mixed with decode, admission limited
// by KV memory, preemption by recompute, per-request sampling and stop handling (sampling.h),
// detokenized text streamed per request.
//
//   engine eng(dec, *tokenizer, {.block_size = 16, .kv_cache_bytes = 64 << 20});   // this rank alone
//   engine eng(executor, *tokenizer, opts);   // the model step behind executor.h (e.g. an EP group)
//   eng.start();                                            // the iteration loop on its own thread
//   eng.submit({.id = "cmpl-1", .prompt = ids, .params = p, .on_event = [](const engine_event& e) {...}});
//   eng.submit({.id = "cmpl-2", .prompt = ids, .params = p, .n = 4, ...});   // 4 samples sharing the prompt
//   eng.abort("cmpl-1");                                    // frees its blocks at the next iteration
//   eng.stop();
//
// Invariants:
//   1. An iteration schedules within max_batch_tokens: first every running sequence's next
//      token or prefill chunk in arrival order, then waiting requests FCFS while the token budget,
//      max_running and the KV blocks allow (a request that does not fit blocks the ones behind
//      it: no starvation). Static batching (the baseline) admits only when nothing runs.
//   2. A prompt's blocks are taken at admission, reusing cached prefix blocks (their tokens are
//      not recomputed); each computed chunk is marked so later requests can reuse it at once.
//   3. When a sampled token needs a block and none is free, the latest-arrived running sequence
//      is preempted: its blocks are freed and it goes back to the front of the queue with its
//      prompt and generated tokens, to be recomputed (its output so far is kept; the client
//      sees no gap). A sequence that cannot fit alone finishes with "length".
//   4. Every request gets exactly one finished event (stop | length | abort | error) after its
//      text events; its blocks are freed before it. Events run on the engine thread.
//   5. Greedy output equals parallel::generate_greedy on the same prompt, token for token,
//      whatever shares the batch (forward_batch.h invariant 3), on one rank or a group
//      (executor.h invariant 2, ep_serve_runner.h invariant 2).
//   6. stop() ends the executor (a group's other ranks return) after the last iteration.
//   7. A request of n samples is n sequences (sample i seeded seed + i, events tagged index i).
//      Sample 0 prefills the prompt; the others are admitted once it has, sharing its computed
//      full blocks (kv_blocks.h invariant 4) and computing only the prompt's last partial block.
//   8. prompt_logprobs: sample 0 computes every prompt token (no prefix hits), the logits of all its
//      prompt positions come back, and one event with the prompt's logprobs (the first token
//      without one) precedes its first token. logprobs / cumulative_logprob come from the raw
//      logits row each token was sampled from (sampling.h invariant 5).
//  10. A resumed request (engine_request::resume) is one sample that another engine started: its
//      sent tokens follow the prompt in the KV cache and are replayed without events through the
//      penalties, the detokenizer, the stop strings and the grammar, so the next event continues the
//      text exactly where the client's stream stopped; max_tokens, min_tokens and completion_tokens
//      count them; its events carry the sample's index. Greedy output goes on as if never moved
//      (invariant 5); a seeded random sample goes on with fresh draws of its seed. Its latencies go on
//      too: TTFT from its arrival (engine_request::arrival, the first rank's), the gap to its next
//      token from the last one its client got (resumed::last_token_age).
//   9. A guided request (sampling_params::grammar) samples only tokens its JSON matcher allows;
//      it finishes with "stop" once the value is complete and nothing more may follow (eos is
//      allowed as soon as it is complete). Text never ends inside a UTF-8 character: an
//      incomplete trailing character is dropped, not shown as U+FFFD.
//  11. With group_member, a model step whose communication fails (errc::aborted: the group's
//      communicator was aborted because a member was lost; errc::io: a peer's transfer failed) is
//      undone: its model pass sent no event, the batch's sequences keep what was computed before it
//      and are scheduled again at the next step; the exception propagates (the group recovers or
//      breaks: elastic/scale/dp_group.h). Any other failure ends the batch with "error" and propagates.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "elastic/engine/executor.h"
#include "elastic/engine/guided_json.h"
#include "elastic/engine/kv_blocks.h"
#include "elastic/engine/sampling.h"
#include "parallel/data/bpe_tokenizer.h"
#include "parallel/model/decoder.h"
#include "parallel/model/paged_kv.h"

namespace troupe::elastic {

struct engine_options {
  // The paged KV store, when the engine makes its own executor (the decoder constructor); an
  // executor brings its store.
  int64_t block_size = 16;
  size_t kv_cache_bytes = size_t{64} << 20;  // the paged KV store's budget
  int64_t num_blocks = 0;                    // > 0: exactly this many blocks (overrides the bytes)
  int64_t max_batch_tokens = 512;            // new tokens per iteration (prefill chunks + decodes)
  int64_t max_running = 64;
  int64_t max_waiting = 1024;                // submit() refuses beyond this
  bool prefix_caching = true;
  bool static_batching = false;              // the baseline of invariant 1
  int64_t keepalive_ms = 5000;               // idle: executor keepalive this often (executor.h)
  // A rank of a data-parallel group (elastic/scale/dp_group.h): a batch the model would refuse is
  // checked before the step and ends with "error" without running (the rank's idle pass still pairs
  // the group's collectives); a failure inside the model step is rethrown, not absorbed (the group
  // is out of step).
  bool group_member = false;
};

struct engine_event {
  int64_t index = 0;                // the sample (invariant 7)
  std::string text;                 // safe to show (stop strings held back)
  std::vector<int32_t> token_ids;   // generated since the last event
  std::vector<token_logprob> logprobs;         // per token of token_ids, with params.logprobs >= 0
  std::vector<token_logprob> prompt_logprobs;  // once, with params.prompt_logprobs >= 0 (invariant 8)
  double cumulative_logprob = 0;               // the sample's tokens so far, when asked
  bool finished = false;
  std::string finish_reason;        // "stop" | "length" | "abort" | "error"
  std::string error;
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct engine_request {
  std::string id;
  std::vector<int32_t> prompt;
  sampling_params params;
  int64_t n = 1;                    // samples of the prompt (invariant 7)
  bool cumulative_logprob = false;  // report each sample's summed logprob (best_of)
  std::function<void(const engine_event&)> on_event;
  // When the request reached the server (TTFT counts from here); unset: when submit() takes it.
  std::chrono::steady_clock::time_point arrival{};
  // A sample that goes on where another engine left it (invariant 10); n must be 1.
  struct resumed {
    int64_t index = 0;                 // the sample's index in the client's request
    std::vector<int32_t> tokens;       // what it generated and the client has been sent
    double cumulative_logprob = 0;     // of those tokens
    bool prompt_logprobs_sent = false;
    std::chrono::microseconds last_token_age{0};  // since the client got its last token (TPOT goes on)
  };
  std::optional<resumed> resume;
  // Admitted by a serving group already and moved here (dp_group.h invariant 7): never refused for a
  // full queue (max_waiting).
  bool admitted = false;
};

// Latency histogram with Prometheus' cumulative buckets (seconds).
struct latency_histogram {
  std::vector<double> bounds;
  std::vector<int64_t> counts;  // per bucket (not cumulative), + the overflow bucket last
  double sum = 0;
  int64_t n = 0;
  explicit latency_histogram(std::vector<double> b);
  void add(double seconds);
  double quantile(double q) const;  // upper bound of the bucket holding the q-th value
  std::string prometheus(const std::string& name, const std::string& help) const;
};

// The buckets (seconds) of the serving latency histograms.
std::vector<double> serving_latency_bounds();

// The queue, KV and token figures every serving /metrics shows: one engine's, or a group's summed.
struct serving_gauges {
  int64_t waiting = 0, running = 0;
  double kv_usage = 0, prefix_hit_rate = 0;
  int64_t preemptions = 0, generated_tokens = 0, prompt_tokens = 0;
};
std::string serving_gauges_text(const serving_gauges& g);

// submit() when the queue is full (HTTP 503).
class engine_busy : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct engine_stats {
  int64_t waiting = 0, running = 0;
  int64_t waiting_tokens = 0;  // the tokens of the waiting sequences (the KV they will need)
  int64_t iterations = 0, preemptions = 0, finished = 0, aborted = 0;
  int64_t prompt_tokens = 0, computed_prompt_tokens = 0, generated_tokens = 0;
  int64_t model_tokens = 0;  // every token a model step ran: prefill chunks, decodes, recomputation
  kv_block_stats kv;
};

// What takes requests for an engine: the engine itself (start() runs its own loop) or a scheduler
// that owns its loop (actors/serve_scheduler.h). Both thread-safe; submit throws like engine::submit.
class request_sink {
 public:
  virtual ~request_sink() = default;
  virtual void submit(engine_request r) = 0;
  // Without waiting: `accepted` gets nullptr once the request is queued, else what submit threw.
  // The default runs submit() on the calling thread.
  virtual void submit_async(engine_request r, std::function<void(std::exception_ptr)> accepted) {
    try {
      submit(std::move(r));
    } catch (...) {
      accepted(std::current_exception());
      return;
    }
    accepted(nullptr);
  }
  virtual void abort(const std::string& id) = 0;
};

// What a scheduler steps (actors/serve_scheduler.h): one engine, or a data-parallel group's rank 0
// (elastic/scale/dp_group.h) that steps every rank's engine in lockstep. All but submit/abort run on
// the stepping thread.
class step_driver : public request_sink {
 public:
  virtual bool step() = 0;                  // one iteration; false when there was nothing to do
  virtual void keepalive() = 0;             // while idle, every keepalive_ms()
  virtual void shutdown() = 0;              // every unfinished request ends with "abort"
  virtual bool inbox_pending() const = 0;   // submits or aborts not taken by an iteration yet
  virtual int64_t keepalive_ms() const = 0;
};

class engine final : public step_driver {
 public:
  // This rank alone: a local_executor over a store of o.num_blocks or o.kv_cache_bytes.
  engine(const parallel::decoder& dec, const parallel::text_tokenizer& tok, engine_options o);
  // The model step behind `exec` (its store's blocks and block size; o's are ignored).
  engine(model_executor& exec, const parallel::text_tokenizer& tok, engine_options o);
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  // Thread-safe. Throws errc::invalid_argument (bad sampling parameters, an empty prompt, a token
  // id outside the vocabulary, a prompt longer than the model's context) and engine_busy when
  // max_waiting requests wait already; nothing is queued then.
  void submit(engine_request r) override;
  void abort(const std::string& id) override;  // thread-safe; unknown ids are ignored
  // submit()'s checks of the input alone (not the queue's room): throws what submit would.
  void check_request(const engine_request& r) const;

  // One iteration on the calling thread (tests, benchmarks); false when there was nothing to do.
  bool step() override;
  // An iteration that always runs the model: step(), or — nothing scheduled — the executor's idle
  // pass (a data-parallel group's rank joins the MoE layers' collectives with no tokens). Returns
  // step()'s answer.
  bool step_or_idle();
  // Every request not finished yet ends with "abort", then the executor ends (a group's other ranks
  // return). On the thread that runs step(); stop() calls it on the engine's own thread.
  void shutdown() override;
  // On the thread that runs step(), while idle, every keepalive_ms (executor.h keepalive).
  void keepalive() override { exec_->keepalive(); }
  int64_t keepalive_ms() const override { return o_.keepalive_ms; }
  // Runs step() on a thread of its own until stop(); idle waits on the queue (a keepalive every keepalive_ms).
  void start();
  void stop();
  // True when submitted requests or aborts have not been taken by an iteration yet.
  bool inbox_pending() const override;
  bool idle() const;
  // Requests or aborts queued, or sequences waiting or running (the thread that runs step(), or
  // any thread for a hint).
  bool has_work() const;

  engine_stats stats() const;
  // Prometheus text: TTFT/TPOT histograms, queue, KV, prefix hits, per-expert load (MoE models)
  std::string metrics_text() const;
  // The per-expert part of metrics_text (empty for a dense model).
  std::string expert_metrics_text() const;
  latency_histogram ttft_histogram() const;  // copies, thread-safe
  latency_histogram tpot_histogram() const;
  const engine_options& options() const { return o_; }
  int64_t num_blocks() const { return kv_.num_blocks(); }
  int ranks() const { return exec_->ranks(); }
  int64_t vocab_size() const { return vocab_; }  // the model's
  const parallel::text_tokenizer& tokenizer() const { return tok_; }

 private:
  struct sequence;
  engine(std::unique_ptr<model_executor> own, const parallel::text_tokenizer& tok, engine_options o);
  void take_inbox();
  void finish(sequence& s, const std::string& reason, const std::string& error = "");
  bool preempt_one(const sequence* for_whom);
  void emit_token(sequence& s, int32_t token, const token_logprob* lp);
  void replay(sequence& s, const engine_request::resumed& from);
  bool admissible(const sequence& s) const;
  int64_t waiting_tokens() const;  // the step thread's (waiting_)
  const token_trie& trie();

  std::unique_ptr<model_executor> own_exec_;
  model_executor* exec_;
  const parallel::text_tokenizer& tok_;
  engine_options o_;
  kv_block_manager kv_;
  int64_t vocab_ = 0, max_positions_ = 0;

  mutable std::mutex mu_;  // inbox, aborts, stats snapshot, histograms
  std::condition_variable cv_;
  std::deque<engine_request> inbox_;
  std::vector<std::string> aborts_;
  std::deque<std::unique_ptr<sequence>> waiting_;
  std::vector<std::unique_ptr<sequence>> running_;
  kv_request_id next_kv_id_ = 1;
  engine_stats stats_;
  latency_histogram ttft_, tpot_;
  std::unique_ptr<token_trie> trie_;  // the vocabulary for guided decoding, made on first use
  std::vector<uint8_t> mask_;         // scratch: a guided sequence's allowed tokens
  std::thread loop_;
  std::atomic<bool> stop_{false};
};

}  // namespace troupe::elastic
