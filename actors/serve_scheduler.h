// actors/serve_scheduler.h — a serving instance's scheduler as a CAF actor. It owns the engine's
// iteration loop (elastic/engine/engine.h: continuous batching, KV admission, preemption): requests
// and aborts arrive as messages — from the HTTP handler threads through serve_scheduler_client,
// later from the DualMap router — and are taken between iterations; while requests run it sends
// itself `step` after each iteration, so new messages interleave with iterations; with nothing to
// do it sleeps on its mailbox (no polling; a keepalive every engine_options::keepalive_ms lets an
// idle group's other ranks hear from rank 0). It runs detached, on a thread of its own: an iteration
// is blocking compute and, on an expert-parallel group, collectives, which never sit on CAF's
// shared scheduler threads.
//
//   elastic::engine eng(executor, tok, opts);                 // not start()ed: the actor drives it
//   serve_scheduler_client sched(system, eng);                // spawns the actor
//   elastic::engine_backend backend(eng, tok, "model", seed, &sched);  // HTTP -> the actor
//   ...
//   sched.stop();   // unfinished requests end with "abort", the group's other ranks return
//
// Invariants:
//   1. Every engine call that changes it (submit, abort, step, shutdown) runs in the actor, one at
//      a time in mailbox order; the engine is never start()ed.
//   2. submit() returns after the engine accepted the request, or throws what the engine threw:
//      elastic::engine_busy (the queue is full) or runtime::error with the engine's code and
//      message (bad input); a refused request leaves nothing queued. Each has a timeout (30 s);
//      after one, an abort of the request follows it (so it never runs without its client).
//   3. At most one `step` message is in flight, so a burst of submits queues no extra iterations;
//      an iteration that did nothing (engine::step() == false) ends the burst until the next message.
//   4. stop() runs engine::shutdown() in the actor, which then quits; stop() returns after both
//      (idempotent, also from the destructor; it waits up to 10 minutes for the iteration in
//      flight). Submits after that are refused (errc::aborted).
//   5. submit_async() never blocks: the request travels to the actor with its answer callback,
//      which is called exactly once — by the actor after engine::submit, or with errc::aborted when
//      the message is dropped because the actor has quit. The HTTP server submits this way.
#pragma once
#include <caf/all.hpp>

#include <atomic>
#include <string>

#include "elastic/engine/engine.h"

namespace troupe::actors {

// The actor's behaviour (spawned detached by serve_scheduler_client).
caf::behavior serve_scheduler(caf::event_based_actor* self, elastic::step_driver* eng);

class serve_scheduler_client final : public elastic::request_sink {
 public:
  // eng: an engine, or a data-parallel group's rank 0 (elastic/scale/dp_group.h)
  serve_scheduler_client(caf::actor_system& system, elastic::step_driver& eng, int timeout_ms = 30000);
  ~serve_scheduler_client() override;
  serve_scheduler_client(const serve_scheduler_client&) = delete;
  serve_scheduler_client& operator=(const serve_scheduler_client&) = delete;

  void submit(elastic::engine_request r) override;
  // Without waiting (invariant 5): `accepted` runs on the actor's thread once the engine took the
  // request or refused it (what engine::submit threw), or with errc::aborted when the actor is gone.
  void submit_async(elastic::engine_request r, std::function<void(std::exception_ptr)> accepted) override;
  void abort(const std::string& id) override;
  // The driver has work the actor does not know of (a change of the group's size was asked for):
  // an iteration runs soon, as after a submit. Never blocks.
  void wake();
  void stop();
  caf::actor handle() const { return actor_; }

 private:
  caf::actor_system& system_;
  elastic::step_driver& eng_;
  caf::actor actor_;
  int timeout_ms_;
  std::atomic<bool> stopped_{false};
};

}  // namespace troupe::actors
