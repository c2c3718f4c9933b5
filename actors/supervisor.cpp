// actors/supervisor.cpp — see supervisor.h.
#include "actors/supervisor.h"

#include <fmt/format.h>

#include <chrono>
#include <map>

#include "actors/expert_balancer.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;
using clock_type = std::chrono::steady_clock;

namespace {

struct member {
  control::Join join;
  caf::actor handle;
  clock_type::time_point last_seen;
  bool alive = true;
};

struct pending_exchange {
  int64_t epoch = 0;
  std::vector<std::string> blobs;
  std::vector<bool> have;
  std::vector<caf::response_promise> promises;
};

struct pending_command {
  bool active = false;
  control::Command cmd;
  std::map<int, control::StatsReport> reports;  // by launcher rank
  caf::response_promise promise;
  std::map<int, control::Progress> progress;    // the latest of each rank, this command
  std::map<int, int64_t> lag_warned;            // rank -> step at which a lag warning was logged
};

struct supervisor_state {
  supervisor_options o;
  std::map<int, member> members;  // by launcher rank
  int64_t epoch = 0;              // 0 while ranks are still joining
  std::vector<int> group;         // launcher ranks of the current group, in group-rank order
  std::vector<int> late;          // launcher ranks of late members, in join order (invariant 8)
  int next_rank = 0;              // the rank the next late member gets
  std::map<std::string, std::map<int, std::string>> published;                        // key -> rank -> blob
  std::map<std::pair<std::string, int>, std::vector<caf::response_promise>> lookups;  // waiting for one
  int restarts_used = 0;
  bool failed = false;
  bool stopping = false;          // shut down (or torn down): members leaving is expected
  std::string failure;            // why the job is over, once failed
  clock_type::time_point started = clock_type::now();
  std::vector<caf::response_promise> group_waiters;
  std::map<std::string, pending_exchange> exchanges;
  pending_command cmd;
  expert_balancer balancer;       // of the running command (invariant 6)
  static inline const char* name = "troupe.supervisor";
};

using sup_actor = caf::stateful_actor<supervisor_state>*;

caf::error failure_error(const std::string& what) { return caf::make_error(caf::sec::runtime_error, what); }

// Launcher rank of the member that sent the current message, or -1.
int sender_rank(sup_actor self) {
  const auto addr = caf::actor_cast<caf::actor_addr>(self->current_sender());
  for (const auto& [r, m] : self->state.members)
    if (m.alive && m.handle.address() == addr) return r;
  return -1;
}

std::string describe(const supervisor_state& st, int rank) {
  const auto it = st.members.find(rank);
  if (it == st.members.end()) return fmt::format("rank {}", rank);
  return fmt::format("rank {} (pid {} on {})", rank, it->second.join.pid(), it->second.join.host());
}

control::Scale group_message(const supervisor_state& st, const std::string& reason) {
  control::Scale s;
  s.set_epoch(st.epoch);
  for (int r : st.group) s.add_members(r);
  s.set_reason(reason);
  return s;
}

// The group and the late members after it: every rank a command runs on, in group-rank order.
std::vector<int> everyone(const supervisor_state& st) {
  std::vector<int> all = st.group;
  all.insert(all.end(), st.late.begin(), st.late.end());
  return all;
}

void send_command_to_group(sup_actor self) {
  auto& st = self->state;
  st.cmd.cmd.set_epoch(st.epoch);
  st.cmd.reports.clear();
  st.balancer.reset(st.epoch, static_cast<int>(st.group.size()), st.cmd.cmd.id());
  for (int r : everyone(st))  // late members too (invariant 8): each one's report is waited for
    if (st.members[r].alive) self->send(st.members[r].handle, st.cmd.cmd);
}

void end_exchanges(sup_actor self, const std::string& why) {
  for (auto& [key, ex] : self->state.exchanges)
    for (auto& p : ex.promises) p.deliver(failure_error(fmt::format("exchange '{}' abandoned: {}", key, why)));
  self->state.exchanges.clear();
}

// The job is over: every survivor is told to stop with exit code 3.
void fail_all(sup_actor self, int failed_rank, const std::string& what) {
  auto& st = self->state;
  if (st.failed) return;
  st.failed = true;
  st.stopping = true;
  st.failure = what;
  log::error("supervisor: tearing the group down: {}", what);
  control::Shutdown s;
  s.set_reason(what);
  s.set_exit_code(exit_group_torn_down);
  s.set_failed_rank(failed_rank);
  for (auto& [r, m] : st.members)
    if (m.alive) self->send(m.handle, s);
  if (st.cmd.active) {
    st.cmd.active = false;
    st.cmd.promise.deliver(failure_error(what));
  }
  for (auto& w : st.group_waiters) w.deliver(failure_error(what));
  st.group_waiters.clear();
  end_exchanges(self, what);
}

// The running command is done once every member of the group still alive has reported.
void complete_command(sup_actor self) {
  auto& st = self->state;
  std::vector<control::StatsReport> out;
  for (int g : everyone(st)) {
    if (!st.members[g].alive) continue;
    auto it = st.cmd.reports.find(g);
    if (it == st.cmd.reports.end()) return;
    out.push_back(it->second);
  }
  st.cmd.active = false;
  st.cmd.promise.deliver(std::move(out));
}

void form_group(sup_actor self) {
  auto& st = self->state;
  st.epoch = 1;
  st.group.clear();
  for (const auto& [r, m] : st.members) st.group.push_back(r);
  const auto scale = group_message(st, "group formed");
  log::info("supervisor: all {} ranks joined; group epoch 1 formed", st.o.world_size);
  for (int r : st.group) self->send(st.members[r].handle, scale);
  for (auto& w : st.group_waiters) w.deliver(scale);
  st.group_waiters.clear();
}

void lose(sup_actor self, int rank, const std::string& reason) {
  auto& st = self->state;
  auto it = st.members.find(rank);
  if (it == st.members.end() || !it->second.alive) return;
  it->second.alive = false;
  const std::string who = describe(st, rank);
  if (st.stopping) return log::debug("supervisor: {} left: {}", who, reason);
  log::error("supervisor: {} lost: {}", who, reason);
  if (st.failed) return;
  const std::string what = fmt::format("{} lost: {}", who, reason);
  for (auto it2 = st.lookups.begin(); it2 != st.lookups.end();) {  // invariant 9: it publishes nothing more
    if (it2->first.second != rank) {
      ++it2;
      continue;
    }
    for (auto& p : it2->second) p.deliver(failure_error(fmt::format("lookup '{}' of {}: {}", it2->first.first, who, what)));
    it2 = st.lookups.erase(it2);
  }
  for (auto& [key, by_rank] : st.published) by_rank.erase(rank);
  if (st.epoch == 0) return fail_all(self, rank, what + " (before the group formed)");
  const std::vector<int> all = everyone(st);
  if (std::find(all.begin(), all.end(), rank) == all.end()) return;
  std::vector<int> survivors;
  for (int r : all)
    if (st.members[r].alive) survivors.push_back(r);
  if (st.o.keep_members && rank != 0 && !survivors.empty()) {  // invariant 7
    log::warn("supervisor: the group goes on without {} ({} members left)", who, survivors.size());
    control::MemberLost ml;
    ml.set_epoch(st.epoch);
    ml.set_rank(rank);
    ml.set_reason(reason);
    for (int r : survivors) self->send(st.members[r].handle, ml);
    control::Shutdown s;  // a frozen process that wakes up again stops instead of rejoining
    s.set_reason(fmt::format("this rank was lost ({}) and the group went on without it", reason));
    s.set_exit_code(exit_group_torn_down);
    s.set_failed_rank(rank);
    self->send(it->second.handle, s);
    if (std::find(st.group.begin(), st.group.end(), rank) != st.group.end())
      end_exchanges(self, what);  // a late member takes part in none (invariant 8)
    if (st.cmd.active) complete_command(self);
    return;
  }
  if (st.restarts_used >= st.o.max_restarts || survivors.empty())
    return fail_all(self, rank,
                    fmt::format("{}; restarts used {} of {}", what, st.restarts_used, st.o.max_restarts));
  // Gang rebuild: the whole group ends; the survivors form the next epoch.
  ++st.restarts_used;
  ++st.epoch;
  st.group = survivors;
  end_exchanges(self, fmt::format("group rebuilt as epoch {}", st.epoch));
  const auto scale = group_message(st, fmt::format("rebuilt after {}", what));
  log::warn("supervisor: rebuilding the group as epoch {} with {} ranks (restart {} of {})", st.epoch,
            survivors.size(), st.restarts_used, st.o.max_restarts);
  for (int r : st.group) self->send(st.members[r].handle, scale);
  if (st.cmd.active) send_command_to_group(self);
}

// A down_msg's reason in words.
std::string down_reason(caf::actor_system& sys, const caf::error& reason) {
  if (reason == caf::exit_reason::remote_link_unreachable)
    return "connection lost (process killed, crashed or its host unreachable)";
  if (reason == caf::exit_reason::user_shutdown) return "its worker actor was shut down";
  if (reason == caf::exit_reason::normal || !reason) return "its worker actor stopped";
  return fmt::format("its worker actor failed: {}", sys.render(reason));
}

bool token_matches(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;  // no early exit: the time does not depend on where they differ
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

caf::behavior supervisor_actor(sup_actor self, supervisor_options o) {
  self->state.o = o;
  self->state.next_rank = o.world_size;
  self->state.balancer = expert_balancer(o.experts);
  self->set_down_handler([=](caf::down_msg& dm) {
    for (auto& [r, m] : self->state.members)
      if (m.alive && m.handle.address() == dm.source) return lose(self, r, down_reason(self->system(), dm.reason));
  });
  self->send(self, check_tick_atom::value);
  return {
      [=](control::Join& j) -> control::JoinReply {
        auto& st = self->state;
        control::JoinReply reply;
        reply.set_heartbeat_interval_ms(st.o.heartbeat_interval_ms);
        reply.set_expert_load_decay(st.o.experts.decay);
        const bool late = j.rank() == -1;  // invariant 8
        int late_alive = 0;
        for (int r : st.late) late_alive += st.members[r].alive ? 1 : 0;
        const std::string why = [&]() -> std::string {
          if (!token_matches(j.cluster_token(), st.o.cluster_token)) return "wrong cluster token";
          if (st.failed) return "the job has already failed: " + st.failure;
          if (late) {
            if (!st.o.keep_members || st.o.open_slots <= 0)
              return "this group takes no late joins (troupe-launch --open-slots N opens some)";
            if (st.epoch == 0) return "the group has not formed yet: join once it serves";
            if (late_alive >= st.o.open_slots) return fmt::format("all {} open slot(s) are taken", st.o.open_slots);
            return "";
          }
          if (j.rank() < 0 || j.rank() >= st.o.world_size)
            return fmt::format("rank {} outside the world of {}", j.rank(), st.o.world_size);
          if (j.world_size() != st.o.world_size)
            return fmt::format("world size {} differs from the supervisor's {}", j.world_size(), st.o.world_size);
          if (st.members.count(j.rank())) return fmt::format("rank {} has already joined", j.rank());
          if (st.epoch != 0) return "the group has already formed";
          return "";
        }();
        if (!why.empty()) {
          log::warn("supervisor: refused a join claiming rank {} from pid {} on {}: {}", j.rank(), j.pid(), j.host(),
                    why);
          reply.set_accepted(false);
          reply.set_reason(why);
          return reply;
        }
        j.clear_cluster_token();
        auto handle = caf::actor_cast<caf::actor>(self->current_sender());
        self->monitor(handle);
        if (late) {
          j.set_rank(st.next_rank++);
          st.late.push_back(j.rank());
          st.members[j.rank()] = member{j, handle, clock_type::now(), true};
          log::info("supervisor: rank {} joined the running group late (pid {} on {}, {}); {} of {} open slot(s) used",
                    j.rank(), j.pid(), j.host(), j.device(), late_alive + 1, st.o.open_slots);
          reply.set_accepted(true);
          reply.set_rank(j.rank());
          self->send(self, late_join_atom::value, j.rank());  // after the reply: its group and command
          return reply;
        }
        st.members[j.rank()] = member{j, handle, clock_type::now(), true};
        log::info("supervisor: rank {} joined (pid {} on {}, {}); {} of {}", j.rank(), j.pid(), j.host(), j.device(),
                  st.members.size(), st.o.world_size);
        reply.set_accepted(true);
        reply.set_rank(j.rank());
        if (static_cast<int>(st.members.size()) == st.o.world_size) {
          // Reply first so the worker knows it is in before the group message arrives.
          self->send(self, wait_group_atom::value, true);
        }
        return reply;
      },
      [=](wait_group_atom, bool) { form_group(self); },
      [=](late_join_atom, int rank) {
        if (self->current_sender() != caf::actor_cast<caf::strong_actor_ptr>(self)) return;  // its own note only
        auto& st = self->state;
        auto it = st.members.find(rank);
        if (it == st.members.end() || !it->second.alive || st.failed) return;
        control::Scale s;
        s.set_epoch(st.epoch);
        for (int r : everyone(st)) {
          s.add_members(r);
          if (r == rank) break;
        }
        s.set_reason("joined the running group");
        self->send(it->second.handle, s);
        if (st.cmd.active) self->send(it->second.handle, st.cmd.cmd);
      },
      [=](control::Publish& p) {  // invariant 9
        auto& st = self->state;
        const int r = sender_rank(self);
        if (r < 0) return;
        st.published[p.key()][r] = p.blob();
        control::Published out;
        out.set_key(p.key());
        out.set_rank(r);
        out.set_blob(p.blob());
        if (auto it = st.lookups.find({p.key(), r}); it != st.lookups.end()) {
          for (auto& w : it->second) w.deliver(out);
          st.lookups.erase(it);
        }
        for (const auto& [rank, m] : st.members)
          if (m.alive && rank != r) self->send(m.handle, out);
      },
      [=](control::Lookup& l) -> caf::result<control::Published> {
        auto& st = self->state;
        if (sender_rank(self) < 0) return failure_error("lookup from a non-member");
        const auto m = st.members.find(l.rank());
        if (m == st.members.end() && l.rank() < st.next_rank && st.epoch != 0)
          return failure_error(fmt::format("lookup '{}': rank {} never joined", l.key(), l.rank()));
        if (m != st.members.end() && !m->second.alive)
          return failure_error(fmt::format("lookup '{}': {} was lost", l.key(), describe(st, l.rank())));
        if (auto k = st.published.find(l.key()); k != st.published.end())
          if (auto b = k->second.find(l.rank()); b != k->second.end()) {
            control::Published out;
            out.set_key(l.key());
            out.set_rank(l.rank());
            out.set_blob(b->second);
            return out;
          }
        auto rp = self->make_response_promise();
        st.lookups[{l.key(), l.rank()}].push_back(rp);
        return rp;
      },
      [=](control::Heartbeat& h) {
        const int r = sender_rank(self);
        if (r < 0 || r != h.rank()) return;
        self->state.members[r].last_seen = clock_type::now();
      },
      [=](control::StatsReport& rep) {
        auto& st = self->state;
        const int r = sender_rank(self);
        if (r < 0 || !st.cmd.active || rep.command_id() != st.cmd.cmd.id() || rep.epoch() != st.epoch) return;
        if (!rep.ok() && std::find(st.late.begin(), st.late.end(), r) != st.late.end() && !st.stopping) {
          // invariant 8: a late member that could not run the command leaves (its slot is free again)
          return lose(self, r, "its command failed: " + rep.error());
        }
        rep.set_rank(r);
        st.cmd.reports[r] = std::move(rep);
        complete_command(self);
      },
      [=](control::Exchange& e) -> caf::result<control::ExchangeResult> {
        auto& st = self->state;
        const int r = sender_rank(self);
        if (r < 0) return failure_error("exchange from a non-member");
        if (st.failed) return failure_error(st.failure);
        const auto pos = std::find(st.group.begin(), st.group.end(), r);
        const int group_rank = pos == st.group.end() ? -1 : static_cast<int>(pos - st.group.begin());
        if (group_rank < 0 || e.rank() != group_rank || e.size() != static_cast<int>(st.group.size()))
          return failure_error(fmt::format("exchange '{}' from rank {}: group rank {} of {} does not match epoch {} "
                                           "(group rank {} of {})",
                                           e.key(), r, e.rank(), e.size(), st.epoch, group_rank, st.group.size()));
        auto& ex = st.exchanges[e.key()];
        if (ex.blobs.empty()) {
          ex.epoch = st.epoch;
          ex.blobs.resize(st.group.size());
          ex.have.assign(st.group.size(), false);
        }
        if (ex.have[static_cast<size_t>(group_rank)])
          return failure_error(fmt::format("exchange '{}': group rank {} sent twice", e.key(), group_rank));
        ex.have[static_cast<size_t>(group_rank)] = true;
        ex.blobs[static_cast<size_t>(group_rank)] = e.blob();
        auto rp = self->make_response_promise();
        ex.promises.push_back(rp);
        if (std::all_of(ex.have.begin(), ex.have.end(), [](bool b) { return b; })) {
          control::ExchangeResult res;
          res.set_key(e.key());
          for (auto& b : ex.blobs) res.add_blobs(b);
          for (auto& p : ex.promises) p.deliver(res);
          st.exchanges.erase(e.key());
        }
        return rp;
      },
      [=](check_tick_atom) {
        auto& st = self->state;
        const auto now = clock_type::now();
        if (!st.failed && st.epoch == 0 &&
            now - st.started > std::chrono::milliseconds(st.o.join_timeout_ms)) {
          std::string missing;
          for (int r = 0; r < st.o.world_size; ++r)
            if (!st.members.count(r)) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
          fail_all(self, -1, fmt::format("rank(s) {} never joined within {} ms", missing, st.o.join_timeout_ms));
        }
        std::vector<std::pair<int, int64_t>> silent;
        for (const auto& [r, m] : st.members) {
          const auto quiet = std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_seen).count();
          if (m.alive && quiet > st.o.heartbeat_timeout_ms) silent.emplace_back(r, quiet);
        }
        for (auto [r, quiet] : silent)
          lose(self, r, fmt::format("no heartbeat for {} ms (timeout {} ms): stopped, wedged or cut off", quiet,
                                    st.o.heartbeat_timeout_ms));
        self->delayed_send(self, std::chrono::milliseconds(std::max(20, st.o.heartbeat_interval_ms / 2)),
                           check_tick_atom::value);
      },
      [=](wait_group_atom) -> caf::result<control::Scale> {
        auto& st = self->state;
        if (st.failed) return failure_error(st.failure);
        if (st.epoch != 0) return group_message(st, "group formed");
        auto rp = self->make_response_promise();
        st.group_waiters.push_back(rp);
        return rp;
      },
      [=](run_command_atom, control::Command& c) -> caf::result<std::vector<control::StatsReport>> {
        auto& st = self->state;
        if (st.failed) return failure_error(st.failure);
        if (st.epoch == 0) return failure_error("no group yet: wait_for_group first");
        if (st.cmd.active) return failure_error("a command is already running");
        st.cmd.active = true;
        st.cmd.cmd = std::move(c);
        st.cmd.progress.clear();
        st.cmd.lag_warned.clear();
        st.cmd.promise = self->make_response_promise();
        send_command_to_group(self);
        return caf::delegated<std::vector<control::StatsReport>>{};
      },
      [=](control::Progress& p) {
        auto& st = self->state;
        const int r = sender_rank(self);
        if (r < 0 || !st.cmd.active || p.command_id() != st.cmd.cmd.id() || p.epoch() != st.epoch) return;
        p.set_rank(r);
        log::debug("progress: rank {} step {}/{} loss {:.4f} {:.0f} tok/s", r, p.step(), p.max_steps(), p.loss(),
                   p.tokens_per_s());
        st.cmd.progress[r] = std::move(p);
        // A straggler: a rank 3+ steps behind the fastest (logged once per 10 steps of lag).
        int64_t lead = 0;
        for (const auto& [rr, q] : st.cmd.progress) lead = std::max(lead, q.step());
        for (const auto& [rr, q] : st.cmd.progress) {
          auto& warned = st.cmd.lag_warned[rr];
          if (lead - q.step() >= 3 && q.step() >= warned + 10) {
            warned = q.step();
            log::warn("rank {} is {} steps behind (step {} vs {})", rr, lead - q.step(), q.step(), lead);
          }
        }
      },
      [=](control::ExpertLoads& l) {
        auto& st = self->state;
        const int r = sender_rank(self);
        if (r < 0 || !st.o.rebalance_experts || !st.cmd.active || l.command_id() != st.cmd.cmd.id() ||
            l.epoch() != st.epoch)
          return;
        const auto pos = std::find(st.group.begin(), st.group.end(), r);
        if (pos == st.group.end()) return;
        l.set_rank(r);
        for (const auto& u : st.balancer.add(static_cast<int>(pos - st.group.begin()), l))
          for (int g : st.group) self->send(st.members[g].handle, u);
      },
      [=](placements_atom) { return self->state.balancer.latest(); },
      [=](progress_atom) {
        std::vector<control::Progress> out;
        for (const auto& [r, p] : self->state.cmd.progress) out.push_back(p);
        return out;
      },
      [=](members_atom) {
        std::vector<control::Join> out;
        for (const auto& [r, m] : self->state.members) out.push_back(m.join);
        return out;
      },
      [=](shutdown_atom, const std::string& reason, int code) {
        control::Shutdown s;
        s.set_reason(reason);
        s.set_exit_code(code);
        s.set_failed_rank(-1);
        for (auto& [r, m] : self->state.members)
          if (m.alive) self->send(m.handle, s);
        self->state.failed = true;  // nothing more to run
        self->state.stopping = true;
        self->state.failure = "shut down: " + reason;
        return true;
      },
  };
}

std::string error_text(caf::actor_system& sys, const caf::error& e) {
  if (e.context().match_elements<std::string>()) return e.context().get_as<std::string>(0);
  return sys.render(e);
}

}  // namespace

caf::actor spawn_supervisor(caf::actor_system& system, const supervisor_options& options) {
  TROUPE_CHECK(options.world_size >= 1, errc::invalid_argument, "supervisor: world size {} must be >= 1",
               options.world_size);
  TROUPE_CHECK(!options.cluster_token.empty(), errc::invalid_argument,
               "supervisor: an empty cluster token would admit anyone (set TROUPE_CLUSTER_TOKEN)");
  options.experts.validate();
  return system.spawn(supervisor_actor, options);
}

supervisor_client::supervisor_client(caf::actor_system& system, caf::actor supervisor)
    : system_(system), supervisor_(std::move(supervisor)) {}

control::Scale supervisor_client::wait_for_group(int timeout_ms) {
  caf::scoped_actor self{system_};
  control::Scale out;
  std::string err;
  self->request(supervisor_, std::chrono::milliseconds(timeout_ms), wait_group_atom::value)
      .receive([&](control::Scale& s) { out = std::move(s); },
               [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::io, "waiting for every rank to join: {}", err);
  return out;
}

std::vector<control::StatsReport> supervisor_client::run(control::Command cmd, int timeout_ms) {
  caf::scoped_actor self{system_};
  std::vector<control::StatsReport> out;
  std::string err;
  self->request(supervisor_, std::chrono::milliseconds(timeout_ms), run_command_atom::value, std::move(cmd))
      .receive([&](std::vector<control::StatsReport>& r) { out = std::move(r); },
               [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::aborted, "command failed: {}", err);
  return out;
}

std::vector<control::Join> supervisor_client::members(int timeout_ms) {
  caf::scoped_actor self{system_};
  std::vector<control::Join> out;
  std::string err;
  self->request(supervisor_, std::chrono::milliseconds(timeout_ms), members_atom::value)
      .receive([&](std::vector<control::Join>& r) { out = std::move(r); },
               [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::io, "asking the supervisor for its members: {}", err);
  return out;
}

std::vector<control::Progress> supervisor_client::progress(int timeout_ms) {
  caf::scoped_actor self{system_};
  std::vector<control::Progress> out;
  std::string err;
  self->request(supervisor_, std::chrono::milliseconds(timeout_ms), progress_atom::value)
      .receive([&](std::vector<control::Progress>& r) { out = std::move(r); },
               [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::io, "asking the supervisor for progress: {}", err);
  return out;
}

std::vector<control::PlacementUpdate> supervisor_client::placements(int timeout_ms) {
  caf::scoped_actor self{system_};
  std::vector<control::PlacementUpdate> out;
  std::string err;
  self->request(supervisor_, std::chrono::milliseconds(timeout_ms), placements_atom::value)
      .receive([&](std::vector<control::PlacementUpdate>& r) { out = std::move(r); },
               [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::io, "asking the supervisor for expert placements: {}", err);
  return out;
}

void supervisor_client::shutdown(const std::string& reason, int exit_code) {
  caf::scoped_actor self{system_};
  std::string err;
  self->request(supervisor_, std::chrono::seconds(10), shutdown_atom::value, reason, exit_code)
      .receive([&](bool) {}, [&](caf::error& e) { err = error_text(system_, e); });
  TROUPE_CHECK(err.empty(), errc::io, "asking the supervisor to shut down: {}", err);
}

}  // namespace troupe::actors
