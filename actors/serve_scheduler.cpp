// actors/serve_scheduler.cpp — see serve_scheduler.h.
#include "actors/serve_scheduler.h"

#include <fmt/format.h>

#include <memory>
#include <exception>
#include <functional>
#include <tuple>
#include <utility>

#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/threads.h"

// An asynchronous submit: the request and whom to tell. The answer is given exactly once: by the
// actor, or — when the message never reaches it (the actor is gone) — by the box's destructor.
struct troupe_async_submit {
  troupe::elastic::engine_request request;
  std::function<void(std::exception_ptr)> accepted;
  void answer(std::exception_ptr e) {
    if (auto f = std::exchange(accepted, nullptr)) f(e);
  }
  ~troupe_async_submit() {
    answer(std::make_exception_ptr(troupe::runtime::error(troupe::runtime::errc::aborted,
                                                          "serve scheduler: the scheduler stopped before taking "
                                                          "request " + request.id)));
  }
};

// Requests carry callbacks: they stay in this process (never through the middleman).
using troupe_engine_request_box = std::shared_ptr<troupe::elastic::engine_request>;
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe_engine_request_box)
using troupe_async_submit_box = std::shared_ptr<troupe_async_submit>;
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(troupe_async_submit_box)

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;

namespace {

using sched_submit_atom = caf::atom_constant<caf::atom("s_submit")>;
using sched_submit_async_atom = caf::atom_constant<caf::atom("s_asubmit")>;
using sched_abort_atom = caf::atom_constant<caf::atom("s_abort")>;
using sched_step_atom = caf::atom_constant<caf::atom("s_step")>;
using sched_stop_atom = caf::atom_constant<caf::atom("s_stop")>;
using sched_alive_atom = caf::atom_constant<caf::atom("s_alive")>;
using sched_wake_atom = caf::atom_constant<caf::atom("s_wake")>;

// How submit's answer travels: kind 0 accepted, 1 engine_busy, 2 runtime::error(code), 3 other.
using submit_answer = std::tuple<int32_t, int32_t, std::string>;

struct scheduler_state {
  bool stepping = false;  // a step message is in flight (invariant 3)
};

void kick(caf::event_based_actor* self, scheduler_state& st) {
  if (st.stepping) return;
  st.stepping = true;
  self->send(self, sched_step_atom::value);
}

}  // namespace

caf::behavior serve_scheduler(caf::event_based_actor* self, elastic::step_driver* eng) {
  runtime::adopt_num_threads();  // its own thread runs the model step's kernels
  auto st = std::make_shared<scheduler_state>();  // only this actor's thread touches it
  const auto keepalive_every = std::chrono::milliseconds(eng->keepalive_ms());
  self->delayed_send(self, keepalive_every, sched_alive_atom::value);
  return {
      [=](sched_submit_atom, troupe_engine_request_box& box) -> submit_answer {
        try {
          eng->submit(std::move(*box));
        } catch (const elastic::engine_busy& e) {
          return {1, 0, e.what()};
        } catch (const runtime::error& e) {
          return {2, static_cast<int32_t>(e.code()), e.message()};
        } catch (const std::exception& e) {
          return {3, 0, e.what()};
        }
        kick(self, *st);
        return {0, 0, std::string()};
      },
      [=](sched_submit_async_atom, troupe_async_submit_box& box) {
        try {
          eng->submit(std::move(box->request));
        } catch (...) {
          box->answer(std::current_exception());
          return;
        }
        box->answer(nullptr);
        kick(self, *st);
      },
      [=](sched_abort_atom, const std::string& id) {
        eng->abort(id);
        kick(self, *st);
      },
      [=](sched_wake_atom) { kick(self, *st); },
      [=](sched_step_atom) {
        runtime::adopt_num_threads();  // cheap; the behaviour may be made before the thread runs it
        bool worked = false;
        try {
          worked = eng->step();
        } catch (const std::exception& e) {
          log::error("serve scheduler: iteration failed: {}", e.what());
        }
        st->stepping = false;
        if (worked || eng->inbox_pending()) kick(self, *st);
      },
      [=](sched_alive_atom) {  // idle: the group hears from rank 0 (executor.h keepalive)
        if (!st->stepping && eng->inbox_pending()) kick(self, *st);
        if (!st->stepping) {
          try {
            eng->keepalive();
          } catch (const std::exception& e) {
            log::error("serve scheduler: keepalive failed: {}", e.what());
          }
        }
        self->delayed_send(self, keepalive_every, sched_alive_atom::value);
      },
      [=](sched_stop_atom) {
        eng->shutdown();
        self->quit();
        return true;
      },
  };
}

serve_scheduler_client::serve_scheduler_client(caf::actor_system& system, elastic::step_driver& eng, int timeout_ms)
    : system_(system), eng_(eng), timeout_ms_(timeout_ms) {
  actor_ = system.spawn<caf::detached>(
      [e = &eng](caf::event_based_actor* self) { return serve_scheduler(self, e); });
}

serve_scheduler_client::~serve_scheduler_client() {
  try {
    stop();
  } catch (const std::exception& e) {
    log::error("serve scheduler: stopping: {}", e.what());
  }
}

void serve_scheduler_client::submit(elastic::engine_request r) {
  TROUPE_CHECK(!stopped_, errc::aborted, "serve scheduler: request {} after the scheduler stopped", r.id);
  const std::string id = r.id;
  auto box = std::make_shared<elastic::engine_request>(std::move(r));
  caf::scoped_actor self{system_};
  submit_answer ans{3, 0, "no answer"};
  self->request(actor_, std::chrono::milliseconds(timeout_ms_), sched_submit_atom::value, std::move(box))
      .receive([&](int32_t kind, int32_t code, std::string& msg) { ans = {kind, code, std::move(msg)}; },
               [&](caf::error& e) { ans = {3, 0, system_.render(e)}; });
  const auto& [kind, code, msg] = ans;
  if (kind == 0) return;
  if (kind == 3)  // no answer in time: the submit may still be queued; its abort queues behind it
    caf::anon_send(actor_, sched_abort_atom::value, id);
  if (kind == 1) throw elastic::engine_busy(msg);
  if (kind == 2) throw runtime::error(static_cast<errc>(code), msg);
  TROUPE_THROW(errc::aborted, "serve scheduler: request {}: {}", id, msg);
}

void serve_scheduler_client::submit_async(elastic::engine_request r,
                                          std::function<void(std::exception_ptr)> accepted) {
  auto box = std::make_shared<troupe_async_submit>();
  box->request = std::move(r);
  box->accepted = std::move(accepted);
  if (stopped_) {
    box->answer(std::make_exception_ptr(runtime::error(
        errc::aborted, fmt::format("serve scheduler: request {} after the scheduler stopped", box->request.id))));
    return;
  }
  caf::anon_send(actor_, sched_submit_async_atom::value, std::move(box));
}

void serve_scheduler_client::abort(const std::string& id) {
  if (!stopped_) caf::anon_send(actor_, sched_abort_atom::value, id);
}

void serve_scheduler_client::wake() {
  if (!stopped_) caf::anon_send(actor_, sched_wake_atom::value);
}

void serve_scheduler_client::stop() {
  if (stopped_.exchange(true)) return;
  caf::scoped_actor self{system_};
  bool done = false;
  std::string err;
  self->request(actor_, std::chrono::minutes(10), sched_stop_atom::value)
      .receive([&](bool) { done = true; }, [&](caf::error& e) { err = system_.render(e); });
  // After an answer the actor is quitting: wait for it. Without one, do not wait without bound.
  if (done) self->wait_for(actor_);
  TROUPE_CHECK(done, errc::aborted, "serve scheduler: stopping: {}", err);
}


}  // namespace troupe::actors
