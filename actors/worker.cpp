// actors/worker.cpp — see worker.h.
#include "actors/worker.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "actors/supervisor.h"
#include "parallel/ep/ep_rebalance.h"
#include "runtime/allocator.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/threads.h"

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;

struct worker_shared {
  caf::actor_system* system = nullptr;
  worker_options o;
  std::map<int, command_handler> handlers;

  std::mutex mu;
  std::condition_variable cv;
  enum class phase { idle, joining, joined, refused, finished } state = phase::idle;
  int64_t epoch = 0;
  std::vector<int> members;
  std::deque<control::Command> queue;
  std::vector<runtime::communicator*> active;
  int64_t active_epoch = 0;
  int exit_code = 0;
  std::string reason;
  bool compute_done = false;
  caf::actor actor;
  caf::actor supervisor;
  std::thread compute;
  // Expert placement (invariant 4), for the running command.
  double expert_load_decay = 0.8;
  int64_t command_id = 0;
  std::map<int, parallel::ep::ep_load_tracker> load_trackers;                 // by layer
  std::map<int, std::map<int64_t, control::PlacementUpdate>> placements;      // layer -> version ->
  // Lost members (invariant 5).
  std::vector<int> lost;
  std::vector<int> loss_members;
  std::vector<runtime::communicator*> loss_comms;
  std::function<void(int, const std::string&)> on_lost;
  std::function<void(const std::string&, int, const std::string&)> on_published;  // invariant 6
  void member_lost(const control::MemberLost& m) {
    std::lock_guard<std::mutex> g(mu);
    if (m.epoch() != epoch || std::find(lost.begin(), lost.end(), m.rank()) != lost.end()) return;
    lost.push_back(m.rank());
    const std::string why = fmt::format("rank {} was lost: {}", m.rank(), m.reason());
    if (on_lost) on_lost(m.rank(), m.reason());  // first: whoever the abort wakes finds the loss named
    if (std::find(loss_members.begin(), loss_members.end(), m.rank()) != loss_members.end())
      for (auto* c : loss_comms) c->abort(why);
  }

  // With mu held: abort the registered communicator when the group it belongs to ended.
  void abort_active_locked(const std::string& why) {
    for (auto* c : active) c->abort(why);
  }
  void finish(int code, const std::string& why) {
    std::lock_guard<std::mutex> g(mu);
    if (state == phase::finished) return;
    if (state == phase::joining || state == phase::idle) state = phase::refused;
    else state = phase::finished;
    exit_code = code;
    reason = why;
    abort_active_locked(why);
    cv.notify_all();
  }
  void new_group(const control::Scale& s) {
    std::lock_guard<std::mutex> g(mu);
    if (s.epoch() <= epoch) return;
    if (epoch != 0) abort_active_locked(fmt::format("group epoch {} ended: {}", epoch, s.reason()));
    epoch = s.epoch();
    members.assign(s.members().begin(), s.members().end());
    lost.clear();
    placements.clear();
    load_trackers.clear();
    cv.notify_all();
  }
};

namespace {

std::string render(caf::actor_system& sys, const caf::error& e) {
  if (e.context().match_elements<std::string>()) return e.context().get_as<std::string>(0);
  return sys.render(e);
}

caf::behavior worker_actor(caf::event_based_actor* self, std::shared_ptr<worker_shared> sh) {
  auto sup = sh->supervisor;
  self->monitor(sup);
  self->set_down_handler([=](caf::down_msg& dm) {
    if (dm.source == sup.address()) {
      sh->finish(exit_supervisor_lost,
                 fmt::format("the supervisor (rank 0) is gone: {}", self->system().render(dm.reason)));
      self->quit();
    }
  });
  control::Join j;
  j.set_rank(sh->o.rank);
  j.set_world_size(sh->o.world_size);
  j.set_cluster_token(sh->o.cluster_token);
  j.set_host(sh->o.host);
  j.set_pid(static_cast<int32_t>(::getpid()));
  j.set_device(sh->o.device);
  for (const auto& b : sh->o.backends) j.add_backends(b);
  auto seq = std::make_shared<int64_t>(0);
  self->request(sup, std::chrono::milliseconds(sh->o.join_timeout_ms), std::move(j))
      .then(
          [=](control::JoinReply& r) {
            if (!r.accepted()) {
              sh->finish(exit_join_refused, "the supervisor refused this rank: " + r.reason());
              self->quit();
              return;
            }
            {
              std::lock_guard<std::mutex> g(sh->mu);
              if (sh->o.rank < 0) sh->o.rank = r.rank();  // invariant 7
              sh->state = worker_shared::phase::joined;
              sh->expert_load_decay = r.expert_load_decay();
              sh->cv.notify_all();
            }
            self->send(self, heartbeat_tick_atom::value, std::max<int64_t>(10, r.heartbeat_interval_ms()));
          },
          [=](caf::error& e) {
            sh->finish(exit_join_refused, "no answer to the join: " + render(self->system(), e));
            self->quit();
          });
  return {
      [=](heartbeat_tick_atom, int64_t interval_ms) {
        control::Heartbeat h;
        h.set_rank(sh->o.rank);
        h.set_seq(++*seq);
        h.set_sent_unix_us(std::chrono::duration_cast<std::chrono::microseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count());
        self->send(sup, h);
        self->delayed_send(self, std::chrono::milliseconds(interval_ms), heartbeat_tick_atom::value, interval_ms);
      },
      [=](control::Command& c) {
        if (c.kind() == control::Command::PING) {  // answered here: the control plane's round trip
          control::StatsReport r;
          r.set_rank(sh->o.rank);
          r.set_command_id(c.id());
          r.set_epoch(c.epoch());
          r.set_ok(true);
          self->send(sup, r);
          return;
        }
        std::lock_guard<std::mutex> g(sh->mu);
        sh->queue.push_back(std::move(c));
        sh->cv.notify_all();
      },
      [=](control::Scale& s) { sh->new_group(s); },
      [=](control::MemberLost& m) { sh->member_lost(m); },
      [=](control::Published& p) {
        std::lock_guard<std::mutex> g(sh->mu);
        if (sh->on_published) sh->on_published(p.key(), p.rank(), p.blob());
      },
      [=](control::Publish& p) { self->send(sup, p); },
      [=](control::Lookup& l, int timeout_ms) {
        auto rp = self->make_response_promise();
        self->request(sup, std::chrono::milliseconds(timeout_ms), std::move(l))
            .then([rp](control::Published& r) mutable { rp.deliver(std::move(r)); },
                  [rp](caf::error& err) mutable { rp.deliver(std::move(err)); });
        return rp;
      },
      [=](control::Shutdown& s) {
        sh->finish(s.exit_code(), s.reason());
        self->quit();
      },
      [=](control::PlacementUpdate& u) {
        std::lock_guard<std::mutex> g(sh->mu);
        if (u.group_epoch() != sh->epoch || u.command_id() != sh->command_id || u.epoch() <= 0) return;
        const int layer = u.layer();
        const int64_t version = u.epoch();
        sh->placements[layer][version] = std::move(u);
      },
      [=](expert_loads_atom, control::ExpertLoads& l) { self->send(sup, l); },
      [=](report_atom, control::StatsReport& r) { self->send(sup, r); },
      [=](progress_atom, control::Progress& p) { self->send(sup, p); },
      [=](control::Exchange& e) {
        auto rp = self->make_response_promise();
        self->request(sup, std::chrono::milliseconds(sh->o.exchange_timeout_ms), std::move(e))
            .then([rp](control::ExchangeResult& r) mutable { rp.deliver(std::move(r)); },
                  [rp](caf::error& err) mutable { rp.deliver(std::move(err)); });
        return rp;
      },
  };
}

// What this process holds through troupe's allocators: the worker's device and the host.
void fill_memory(const std::string& dev_name, control::MemoryStats& m) {
  try {
    auto& dev = runtime::allocator_for(runtime::parse_device(dev_name));
    m.set_device_bytes_in_use(static_cast<int64_t>(dev.allocated_bytes()));
    m.set_device_bytes_peak(static_cast<int64_t>(dev.peak_bytes()));
    m.set_host_bytes_in_use(static_cast<int64_t>(runtime::cpu_allocator().allocated_bytes()));
  } catch (const std::exception& e) {
    log::warn("memory stats for {}: {}", dev_name, e.what());
  }
}

void compute_loop(std::shared_ptr<worker_shared> sh) {
  for (;;) {
    control::Command cmd;
    std::vector<int> members;
    {
      std::unique_lock<std::mutex> lock(sh->mu);
      sh->cv.wait(lock, [&] { return !sh->queue.empty() || sh->state == worker_shared::phase::finished; });
      if (sh->state == worker_shared::phase::finished) break;
      cmd = std::move(sh->queue.front());
      sh->queue.pop_front();
      if (cmd.epoch() != sh->epoch) continue;  // stale: the supervisor re-issues it to the new group
      members = sh->members;
      sh->command_id = cmd.id();
      sh->placements.clear();
      sh->load_trackers.clear();
    }
    control::StatsReport rep;
    rep.set_rank(sh->o.rank);
    rep.set_command_id(cmd.id());
    rep.set_epoch(cmd.epoch());
    worker_context ctx(sh, cmd.epoch(), members);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      auto it = sh->handlers.find(static_cast<int>(cmd.kind()));
      TROUPE_CHECK(it != sh->handlers.end(), errc::unsupported, "rank {}: no handler for command {}", sh->o.rank,
                   control::Command::Kind_Name(cmd.kind()));
      runtime::adopt_num_threads();  // the process's thread setting, on this thread (runtime/threads.h)
      it->second(cmd, ctx, rep);
      rep.set_ok(true);
    } catch (const std::exception& e) {
      rep.set_ok(false);
      rep.set_error(e.what());
      if (!ctx.group_over()) log::error("command {} failed: {}", control::Command::Kind_Name(cmd.kind()), e.what());
    }
    ctx.set_active(nullptr);
    ctx.set_loss_comms({}, {});
    ctx.on_member_lost(nullptr);
    ctx.on_published(nullptr);
    fill_memory(sh->o.device, *rep.mutable_memory());
    (*rep.mutable_timings_s())["command"] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    caf::anon_send(sh->actor, report_atom::value, std::move(rep));
  }
  std::lock_guard<std::mutex> g(sh->mu);
  sh->compute_done = true;
  sh->cv.notify_all();
}

// runtime::bootstrap through the supervisor (Exchange messages, via this worker's actor
// so the supervisor sees a member as the sender).
class supervisor_bootstrap final : public runtime::bootstrap {
 public:
  supervisor_bootstrap(std::shared_ptr<worker_shared> sh, std::string prefix, int rank, int size)
      : sh_(std::move(sh)), prefix_(std::move(prefix)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::vector<std::string> all_gather(const std::string& mine) override {
    control::Exchange e;
    e.set_key(fmt::format("{}/{}", prefix_, seq_++));
    e.set_rank(rank_);
    e.set_size(size_);
    e.set_blob(mine);
    caf::scoped_actor self{*sh_->system};
    std::vector<std::string> out;
    std::string err;
    self->request(sh_->actor, std::chrono::milliseconds(sh_->o.exchange_timeout_ms + 1000), std::move(e))
        .receive([&](control::ExchangeResult& r) { out.assign(r.blobs().begin(), r.blobs().end()); },
                 [&](caf::error& x) { err = render(*sh_->system, x); });
    TROUPE_CHECK(err.empty(), errc::aborted, "bootstrap '{}' through the supervisor: {}", prefix_, err);
    TROUPE_CHECK(static_cast<int>(out.size()) == size_, errc::internal, "bootstrap '{}': {} blobs for {} ranks",
                 prefix_, out.size(), size_);
    return out;
  }

 private:
  std::shared_ptr<worker_shared> sh_;
  std::string prefix_;
  int rank_, size_;
  int seq_ = 0;
};

}  // namespace

worker_context::worker_context(std::shared_ptr<worker_shared> shared, int64_t epoch, std::vector<int> members)
    : shared_(std::move(shared)), epoch_(epoch), members_(std::move(members)) {}

int worker_context::rank() const { return shared_->o.rank; }

int worker_context::group_rank() const {
  for (size_t i = 0; i < members_.size(); ++i)
    if (members_[i] == shared_->o.rank) return static_cast<int>(i);
  return -1;
}

std::unique_ptr<runtime::bootstrap> worker_context::bootstrap(const std::string& name) {
  TROUPE_CHECK(group_rank() >= 0, errc::internal, "rank {} is not in group epoch {}", rank(), epoch_);
  return std::make_unique<supervisor_bootstrap>(shared_, fmt::format("{}/epoch-{}", name, epoch_), group_rank(),
                                                group_size());
}

void worker_context::set_active(runtime::communicator* c) {
  set_active(c != nullptr ? std::vector<runtime::communicator*>{c} : std::vector<runtime::communicator*>{});
}

void worker_context::set_active(std::vector<runtime::communicator*> comms) {
  std::lock_guard<std::mutex> g(shared_->mu);
  comms.erase(std::remove(comms.begin(), comms.end(), nullptr), comms.end());
  shared_->active = comms;
  shared_->active_epoch = epoch_;
  if (!comms.empty() && (shared_->epoch != epoch_ || shared_->state == worker_shared::phase::finished)) {
    const std::string why = shared_->state == worker_shared::phase::finished
                                ? shared_->reason
                                : fmt::format("group epoch {} already ended", epoch_);
    for (auto* c : comms) c->abort(why);
  }
}

void worker_context::set_loss_comms(std::vector<int> members, std::vector<runtime::communicator*> comms) {
  std::lock_guard<std::mutex> g(shared_->mu);
  comms.erase(std::remove(comms.begin(), comms.end(), nullptr), comms.end());
  shared_->loss_members = std::move(members);
  shared_->loss_comms = std::move(comms);
  for (int r : shared_->lost)
    if (std::find(shared_->loss_members.begin(), shared_->loss_members.end(), r) != shared_->loss_members.end())
      for (auto* c : shared_->loss_comms) c->abort(fmt::format("rank {} was lost", r));
}

void worker_context::on_member_lost(std::function<void(int rank, const std::string& reason)> callback) {
  std::lock_guard<std::mutex> g(shared_->mu);
  shared_->on_lost = std::move(callback);
}

void worker_context::publish(const std::string& key, const std::string& blob) {
  control::Publish p;
  p.set_key(key);
  p.set_blob(blob);
  caf::anon_send(shared_->actor, std::move(p));
}

std::string worker_context::lookup(const std::string& key, int of_rank, int timeout_ms) {
  control::Lookup l;
  l.set_key(key);
  l.set_rank(of_rank);
  caf::scoped_actor self{*shared_->system};
  std::string out, err;
  self->request(shared_->actor, std::chrono::milliseconds(timeout_ms + 1000), std::move(l), timeout_ms)
      .receive([&](control::Published& p) { out = p.blob(); }, [&](caf::error& x) { err = render(*shared_->system, x); });
  TROUPE_CHECK(err.empty(), errc::io, "rank {}: looking up '{}' of rank {} through the supervisor: {}", rank(), key,
               of_rank, err);
  return out;
}

void worker_context::on_published(
    std::function<void(const std::string& key, int rank, const std::string& blob)> callback) {
  std::lock_guard<std::mutex> g(shared_->mu);
  shared_->on_published = std::move(callback);
}

std::vector<int> worker_context::lost_members() const {
  std::lock_guard<std::mutex> g(shared_->mu);
  return shared_->lost;
}

void worker_context::report_progress(control::Progress p) {
  p.set_rank(rank());
  p.set_epoch(epoch_);
  caf::anon_send(shared_->actor, progress_atom::value, std::move(p));
}

void worker_context::report_expert_loads(int layer, int64_t step, const std::vector<int64_t>& loads) {
  control::ExpertLoads m;
  {
    std::lock_guard<std::mutex> g(shared_->mu);
    auto it = shared_->load_trackers.find(layer);
    if (it == shared_->load_trackers.end())
      it = shared_->load_trackers
               .emplace(layer, parallel::ep::ep_load_tracker(static_cast<int64_t>(loads.size()),
                                                             shared_->expert_load_decay))
               .first;
    it->second.observe(loads);
    m.set_command_id(shared_->command_id);
    for (double x : it->second.ema()) m.add_ema(x);
  }
  m.set_rank(rank());
  m.set_epoch(epoch_);
  m.set_step(step);
  m.set_layer(layer);
  for (int64_t x : loads) m.add_loads(x);
  caf::anon_send(shared_->actor, expert_loads_atom::value, std::move(m));
}

double worker_context::expert_load_decay() const {
  std::lock_guard<std::mutex> g(shared_->mu);
  return shared_->expert_load_decay;
}

int64_t worker_context::placement_version(int layer) const {
  std::lock_guard<std::mutex> g(shared_->mu);
  const auto it = shared_->placements.find(layer);
  return it == shared_->placements.end() || it->second.empty() ? 0 : it->second.rbegin()->first;
}

std::optional<control::PlacementUpdate> worker_context::placement_update(int layer, int64_t version) const {
  std::lock_guard<std::mutex> g(shared_->mu);
  const auto it = shared_->placements.find(layer);
  if (it == shared_->placements.end()) return std::nullopt;
  const auto v = it->second.find(version);
  if (v == it->second.end()) return std::nullopt;
  return v->second;
}

bool worker_context::group_over() const {
  std::lock_guard<std::mutex> g(shared_->mu);
  return shared_->epoch != epoch_ || shared_->state == worker_shared::phase::finished;
}

caf::actor_system& worker_context::system() const { return *shared_->system; }

worker::worker(caf::actor_system& system, worker_options options) : shared_(std::make_shared<worker_shared>()) {
  shared_->system = &system;
  shared_->o = std::move(options);
}

worker::~worker() {
  shared_->finish(shared_->exit_code, "worker destroyed");
  if (shared_->compute.joinable()) shared_->compute.join();
  if (shared_->actor) caf::anon_send_exit(shared_->actor, caf::exit_reason::user_shutdown);
}

void worker::on(control::Command::Kind kind, command_handler handler) {
  shared_->handlers[static_cast<int>(kind)] = std::move(handler);
}

void worker::join(caf::actor supervisor) {
  TROUPE_CHECK(supervisor, errc::invalid_argument, "worker::join: no supervisor");
  {
    std::lock_guard<std::mutex> g(shared_->mu);
    TROUPE_CHECK(shared_->state == worker_shared::phase::idle, errc::invalid_argument, "worker::join called twice");
    shared_->state = worker_shared::phase::joining;
    shared_->supervisor = supervisor;
  }
  shared_->actor = shared_->system->spawn(worker_actor, shared_);
  std::unique_lock<std::mutex> lock(shared_->mu);
  shared_->cv.wait(lock, [&] { return shared_->state != worker_shared::phase::joining; });
  if (shared_->state == worker_shared::phase::refused) {
    shared_->state = worker_shared::phase::finished;
    TROUPE_THROW(errc::invalid_argument, "rank {}: {}", shared_->o.rank, shared_->reason);
  }
  lock.unlock();
  shared_->compute = std::thread(compute_loop, shared_);
}

int worker::wait() {
  std::unique_lock<std::mutex> lock(shared_->mu);
  shared_->cv.wait(lock, [&] { return shared_->state == worker_shared::phase::finished; });
  const bool stopped = !shared_->compute.joinable() ||
                       shared_->cv.wait_for(lock, std::chrono::seconds(10), [&] { return shared_->compute_done; });
  const int code = shared_->exit_code;
  if (!stopped) {
    log::error("rank {}: the running command ignored the teardown for 10 s; exiting with code {}: {}",
               shared_->o.rank, code, shared_->reason);
    std::fflush(nullptr);
    std::_Exit(code);
  }
  lock.unlock();
  if (shared_->compute.joinable()) shared_->compute.join();
  return code;
}

std::string worker::exit_reason() const {
  std::lock_guard<std::mutex> g(shared_->mu);
  return shared_->reason;
}

caf::actor worker::handle() const { return shared_->actor; }

int worker::rank() const {
  std::lock_guard<std::mutex> g(shared_->mu);
  return shared_->o.rank;
}

}  // namespace troupe::actors
