// Every control message crosses a process boundary through the CAF middleman and
// comes back equal; an unregistered type works inside a process and fails only
// across the network. The second process is this executable re-run as an echo
// server (TROUPE_ECHO_SERVER=1): it publishes an actor that reflects every message.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <caf/io/all.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "actors/messages.h"

extern char** environ;
using namespace troupe;

namespace {

struct test_config : caf::actor_system_config {
  test_config() {
    load<caf::io::middleman>();
    actors::add_control_messages(*this);
    set("scheduler.max-threads", size_t{1});
  }
};

caf::behavior echo(caf::event_based_actor* self) {
  self->set_default_handler(caf::reflect);
  return {[](int32_t x) { return x; }};
}

// The child: publish the echo actor on 127.0.0.1, print the port, serve until stdin closes.
int run_echo_server() {
  test_config cfg;
  caf::actor_system sys{cfg};
  auto server = sys.spawn(echo);
  auto port = sys.middleman().publish(server, 0, "127.0.0.1");
  if (!port) return 2;
  std::printf("%u\n", static_cast<unsigned>(*port));
  std::fflush(stdout);
  char buf[16];
  while (::read(STDIN_FILENO, buf, sizeof buf) > 0) {
  }
  sys.middleman().close(*port);
  caf::anon_send_exit(server, caf::exit_reason::user_shutdown);
  return 0;
}

struct echo_process {
  pid_t pid = -1;
  int to_child = -1;
  uint16_t port = 0;
  echo_process() {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    ::setenv("TROUPE_ECHO_SERVER", "1", 1);
    char exe[] = "/proc/self/exe";
    char* argv[] = {exe, nullptr};
    if (posix_spawn(&pid, exe, &fa, nullptr, argv, environ) != 0) pid = -1;
    ::unsetenv("TROUPE_ECHO_SERVER");
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_child = in[1];
    char line[32] = {0};
    ssize_t n = 0, got = 0;
    while (got < 31 && (n = ::read(out[0], line + got, 1)) == 1 && line[got] != '\n') ++got;
    ::close(out[0]);
    port = static_cast<uint16_t>(std::atoi(line));
  }
  ~echo_process() {
    if (to_child >= 0) ::close(to_child);  // the child exits when stdin closes
    if (pid > 0) {
      int status = 0;
      for (int i = 0; i < 50 && ::waitpid(pid, &status, WNOHANG) == 0; ++i) ::usleep(100000);
      if (::waitpid(pid, &status, WNOHANG) == 0) ::kill(pid, SIGKILL), ::waitpid(pid, &status, 0);
    }
  }
};

// Sends `x` to `dest` and returns the protobuf bytes of what came back, or the error.
template <class T>
std::pair<std::string, std::string> round_trip(caf::actor_system& sys, const caf::actor& dest, const T& x,
                                               std::chrono::seconds timeout = std::chrono::seconds(10)) {
  caf::scoped_actor self{sys};
  std::string back, err;
  self->request(dest, timeout, x).receive([&](T& y) { back = y.SerializeAsString(); },
                                          [&](caf::error& e) { err = sys.render(e); });
  return {back, err};
}

// One of each message, with every field set to something not default.
auto one_of_each() {
  control::Join j;
  j.set_rank(3), j.set_world_size(8), j.set_cluster_token("tok"), j.set_host("node-7"), j.set_pid(4242);
  j.set_device("cuda:3"), j.add_backends("nccl"), j.add_backends("ucx");
  control::JoinReply jr;
  jr.set_accepted(false), jr.set_reason("wrong cluster token"), jr.set_heartbeat_interval_ms(500), jr.set_expert_load_decay(0.875);
  control::Heartbeat h;
  h.set_rank(5), h.set_seq(123456789012345), h.set_sent_unix_us(-7);
  control::Command c;
  c.set_id(99), c.set_kind(control::Command::COLLECTIVE_LOOP), c.set_epoch(4), (*c.mutable_args())["backend"] = "ucx";
  control::StatsReport s;
  s.set_rank(2), s.set_command_id(99), s.set_epoch(4), s.set_ok(true), s.set_error("none");
  (*s.mutable_timings_s())["all_reduce"] = 0.125, s.mutable_memory()->set_device_bytes_peak(1ll << 40);
  s.add_expert_loads(17), s.add_expert_loads(0), s.add_lines("ucx: 47/47");
  control::PlacementUpdate p;
  p.set_epoch(5), p.set_num_experts(64);
  auto* rep = p.add_replicas();
  rep->set_expert(63), rep->set_rank(7), rep->set_share(0.25);
  p.set_layer(3), p.set_group_epoch(2), p.set_command_id(11), p.set_num_ranks(8), p.set_step(40);
  p.set_max_over_mean_before(2.8), p.set_max_over_mean_after(1.68);
  control::Scale sc;
  sc.set_epoch(6), sc.add_members(0), sc.add_members(2), sc.set_reason("rank 1 lost");
  control::Shutdown sd;
  sd.set_reason("rank 1 lost"), sd.set_exit_code(3), sd.set_failed_rank(1);
  control::Exchange e;
  e.set_key("ucx/epoch-1/0"), e.set_rank(1), e.set_size(2), e.set_blob(std::string("\0\1\2\xff", 4));
  control::ExchangeResult er;
  er.set_key("ucx/epoch-1/0"), er.add_blobs(std::string("\0a", 2)), er.add_blobs("b");
  control::Progress pr;
  pr.set_rank(1), pr.set_command_id(7), pr.set_epoch(1), pr.set_step(120), pr.set_max_steps(300);
  pr.set_loss(2.25), pr.set_tokens_per_s(5120.5), pr.set_step_s(0.4), pr.mutable_memory()->set_host_bytes_in_use(1 << 20);
  (*pr.mutable_values())["val_loss"] = 2.5;
  control::ExpertLoads el;
  el.set_rank(2), el.set_command_id(11), el.set_epoch(2), el.set_step(40), el.set_layer(3);
  el.add_ema(40.5), el.add_ema(0.0), el.add_ema(3.25), el.add_loads(41), el.add_loads(0), el.add_loads(3);
  control::MemberLost ml;
  ml.set_epoch(1), ml.set_rank(2), ml.set_reason("connection lost");
  control::Publish pu;
  pu.set_key("ucx.pool"), pu.set_blob(std::string("\0addr\xff", 6));
  control::Lookup lk;
  lk.set_key("ucx.pool"), lk.set_rank(5);
  control::Published pd;
  pd.set_key("serve.standby"), pd.set_rank(5), pd.set_blob("1");
  return std::make_tuple(j, jr, h, c, s, p, sc, sd, e, er, pr, el, ml, pu, lk, pd);
}

}  // namespace

TEST(ActorsMessages, EveryControlMessageCrossesTheMiddlemanAndComesBackEqual) {
  echo_process child;
  ASSERT_GT(child.pid, 0);
  ASSERT_NE(child.port, 0) << "the echo server did not start";
  test_config cfg;
  caf::actor_system sys{cfg};
  auto remote = sys.middleman().remote_actor("127.0.0.1", child.port);
  ASSERT_TRUE(remote) << sys.render(remote.error());
  const auto all = one_of_each();
  static_assert(std::tuple_size_v<decltype(all)> == 16);
  ASSERT_EQ(actors::control_message_names().size(), 16u);
  int checked = 0;
  std::apply(
      [&](const auto&... msg) {
        auto one = [&](const auto& m) {
          const std::string name = m.GetDescriptor()->name();
          const auto [back, err] = round_trip(sys, *remote, m);
          EXPECT_TRUE(err.empty()) << name << ": " << err;
          EXPECT_EQ(back, m.SerializeAsString()) << name << " changed on the way";
          EXPECT_FALSE(back.empty()) << name;
          checked += err.empty() && back == m.SerializeAsString();
        };
        (one(msg), ...);
      },
      all);
  EXPECT_EQ(checked, 16);
}

TEST(ActorsMessages, AnUnregisteredTypeWorksLocallyButNotAcrossTheNetwork) {
  control::MemoryStats unregistered;  // a sub-message: never registered on its own
  unregistered.set_device_bytes_in_use(12345);
  test_config cfg;
  caf::actor_system sys{cfg};
  // In-process: CAF hands the object over without serializing it.
  auto local = sys.spawn(echo);
  auto [back, err] = round_trip(sys, local, unregistered);
  EXPECT_TRUE(err.empty()) << err;
  EXPECT_EQ(back, unregistered.SerializeAsString());

  // Across the network it cannot be serialized: the request fails (times out).
  echo_process child;
  ASSERT_NE(child.port, 0);
  auto remote = sys.middleman().remote_actor("127.0.0.1", child.port);
  ASSERT_TRUE(remote) << sys.render(remote.error());
  std::tie(back, err) = round_trip(sys, *remote, unregistered, std::chrono::seconds(2));
  EXPECT_TRUE(back.empty()) << "an unregistered type crossed the network";
  EXPECT_FALSE(err.empty());
  // A registered one still goes through on the same connection afterwards.
  control::Heartbeat h;
  h.set_seq(1);
  std::tie(back, err) = round_trip(sys, *remote, h);
  EXPECT_TRUE(err.empty()) << err;
  EXPECT_EQ(back, h.SerializeAsString());
}

int main(int argc, char** argv) {
  if (std::getenv("TROUPE_ECHO_SERVER")) return run_echo_server();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
