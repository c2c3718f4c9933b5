// The actor runtime in one process: each "rank" is a cluster_node with its own CAF
// actor system, talking to rank 0's supervisor through the middleman over loopback TCP
// — the same path as separate processes. Group formation, refused joins, commands and
// their reports, the supervisor-backed bootstrap, losing a member (gang teardown), and
// rebuilding the group with the survivors (max_restarts), and a group that outlives a lost member
// (keep_members).
#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <functional>
#include <thread>

#include "actors/cluster.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

using namespace troupe;
using control::Command;

namespace {

actors::cluster_options opts(int rank, int world, int port, const std::string& token = "s3cret-token") {
  actors::cluster_options o;
  o.rank = rank;
  o.world_size = world;
  o.supervisor_port = port;
  o.cluster_token = token;
  o.host = "test";
  o.heartbeat_interval_ms = 100;
  o.heartbeat_timeout_ms = 3000;
  o.join_timeout_ms = 20000;
  o.scheduler_threads = 1;
  return o;
}

// A command that runs until its group ends (then throws) or `iterations` x 5 ms pass.
void slow_command(const Command& c, actors::worker_context& ctx, control::StatsReport& rep) {
  const int iterations = std::stoi(c.args().at("iterations"));
  for (int i = 0; i < iterations; ++i) {
    if (ctx.group_over()) TROUPE_THROW(runtime::errc::aborted, "group over");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  rep.add_lines(fmt::format("done in epoch {} as {} of {}", ctx.epoch(), ctx.group_rank(), ctx.group_size()));
}

// Exchanges "r<rank>" with the whole group through the supervisor.
void gather_command(const Command&, actors::worker_context& ctx, control::StatsReport& rep) {
  const auto scratch = runtime::tensor::zeros({1 << 18});  // 1 MiB: shows in the report's peak
  auto boot = ctx.bootstrap("test");
  for (int round = 0; round < 2; ++round) {
    const auto blobs = boot->all_gather(fmt::format("r{}.{}", ctx.rank(), round));
    std::string joined;
    for (const auto& b : blobs) joined += b + " ";
    rep.add_lines(joined);
  }
}

struct node_thread {
  std::thread t;
  std::atomic<int> code{-1};
  std::string reason;
};

// Waits (up to 10 s) to hear that a member was lost: the loss callback runs, a communicator registered
// for that member is aborted, and the group's epoch does not change.
void loss_command(const Command&, actors::worker_context& ctx, control::StatsReport& rep) {
  auto comm = std::move(runtime::make_inproc_group(1)[0]);
  std::atomic<int> heard{-1};
  ctx.on_member_lost([&](int rank, const std::string&) { heard = rank; });
  ctx.set_loss_comms(ctx.members(), {comm.get()});
  for (int i = 0; i < 2000 && heard < 0 && !ctx.group_over(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  bool aborted = false;
  try {
    comm->barrier();
  } catch (const runtime::error& e) {
    aborted = e.code() == runtime::errc::aborted;
  }
  rep.add_lines(fmt::format("heard {}; lost {}; aborted {}; epoch {}; over {}", heard.load(),
                            fmt::join(ctx.lost_members(), ","), aborted, ctx.epoch(), ctx.group_over()));
}

// Publishes "a<rank>" under "addr". The first members wait (up to 10 s) to hear ranks 2 and 3 publish
// and then look rank 2 up; the late members (2, 3) look up ranks 0 and 1.
void publish_command(const Command&, actors::worker_context& ctx, control::StatsReport& rep) {
  std::mutex mu;
  std::vector<std::string> heard;
  ctx.on_published([&](const std::string& key, int rank, const std::string& blob) {
    std::lock_guard<std::mutex> g(mu);
    heard.push_back(fmt::format("{}:{}={}", key, rank, blob));
  });
  ctx.publish("addr", fmt::format("a{}", ctx.rank()));
  std::string looked;
  if (ctx.rank() < 2) {
    for (int i = 0; i < 2000; ++i) {
      {
        std::lock_guard<std::mutex> g(mu);
        if (std::find(heard.begin(), heard.end(), "addr:2=a2") != heard.end() &&
            std::find(heard.begin(), heard.end(), "addr:3=a3") != heard.end())
          break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    looked = ctx.lookup("addr", 2, 10000);
  } else {
    looked = ctx.lookup("addr", 0, 10000) + "," + ctx.lookup("addr", 1, 10000);
  }
  std::lock_guard<std::mutex> g(mu);
  if (ctx.rank() >= 2)
    rep.add_lines(fmt::format("rank {} = {} of {} in epoch {}; looked up {}", ctx.rank(), ctx.group_rank(),
                              ctx.group_size(), ctx.epoch(), looked));
  else
    rep.add_lines(fmt::format("rank {} = {} of {} in epoch {}; heard rank 2: {}; looked up {}", ctx.rank(),
                              ctx.group_rank(), ctx.group_size(), ctx.epoch(),
                              std::find(heard.begin(), heard.end(), "addr:2=a2") != heard.end(), looked));
}

void register_handlers(actors::cluster_node& node) {
  node.local_worker().on(Command::TRAIN, publish_command);
  node.local_worker().on(Command::RUN_SELFTEST, gather_command);
  node.local_worker().on(Command::SERVE, loss_command);
  node.local_worker().on(Command::COLLECTIVE_LOOP, slow_command);
}

// Starts ranks 1..world-1 on threads; each joins, then waits (or leaves early when
// `leave_after_join` says so for its rank).
std::vector<std::unique_ptr<node_thread>> start_workers(int world, int port,
                                                        const std::function<bool(int)>& leave_after_join = nullptr,
                                                        std::atomic<int>* joined = nullptr) {
  std::vector<std::unique_ptr<node_thread>> out;
  for (int r = 1; r < world; ++r) {
    auto nt = std::make_unique<node_thread>();
    node_thread* p = nt.get();
    nt->t = std::thread([=] {
      actors::cluster_node node(opts(r, world, port));
      register_handlers(node);
      node.start();
      if (joined) ++*joined;
      if (leave_after_join && leave_after_join(r)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        p->code = -2;  // destroyed without waiting: its actors go down
        return;
      }
      p->code = node.wait();
      p->reason = node.local_worker().exit_reason();
    });
    out.push_back(std::move(nt));
  }
  return out;
}

}  // namespace

TEST(ActorsCluster, GroupFormsAndCommandsReturnOneReportPerRank) {
  actors::cluster_node sup(opts(0, 3, 0));
  register_handlers(sup);
  auto workers = start_workers(3, sup.supervisor_port());
  sup.start();
  auto group = sup.driver().wait_for_group(20000);
  EXPECT_EQ(group.epoch(), 1);
  ASSERT_EQ(group.members_size(), 3);
  const auto members = sup.driver().members();
  ASSERT_EQ(members.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(members[static_cast<size_t>(r)].rank(), r);
    EXPECT_TRUE(members[static_cast<size_t>(r)].cluster_token().empty()) << "the token must not be kept";
  }

  Command ping;
  ping.set_id(1);
  ping.set_kind(Command::PING);
  auto reports = sup.driver().run(ping, 10000);
  ASSERT_EQ(reports.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(reports[static_cast<size_t>(r)].rank(), r);
    EXPECT_TRUE(reports[static_cast<size_t>(r)].ok());
  }

  // The bootstrap through the supervisor: every rank sees every blob, in rank order.
  Command gather;
  gather.set_id(2);
  gather.set_kind(Command::RUN_SELFTEST);
  reports = sup.driver().run(gather, 10000);
  ASSERT_EQ(reports.size(), 3u);
  for (const auto& rep : reports) {
    ASSERT_TRUE(rep.ok()) << rep.error();
    ASSERT_EQ(rep.lines_size(), 2);
    EXPECT_EQ(rep.lines(0), "r0.0 r1.0 r2.0 ");
    EXPECT_EQ(rep.lines(1), "r0.1 r1.1 r2.1 ");
    EXPECT_GE(rep.memory().device_bytes_peak(), 1 << 20) << "the worker's allocations must show in its report";
    EXPECT_GT(rep.timings_s().at("command"), 0.0);
  }

  // An unknown command kind fails on every rank, with the reason.
  Command stats;
  stats.set_id(3);
  stats.set_kind(Command::REPORT_STATS);
  reports = sup.driver().run(stats, 10000);
  for (const auto& rep : reports) {
    EXPECT_FALSE(rep.ok());
    EXPECT_NE(rep.error().find("no handler for command REPORT_STATS"), std::string::npos) << rep.error();
  }

  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  for (auto& w : workers) {
    w->t.join();
    EXPECT_EQ(w->code, 0);
    EXPECT_EQ(w->reason, "test done");
  }
}

TEST(ActorsCluster, AJoinWithTheWrongTokenIsRefused) {
  actors::cluster_node sup(opts(0, 2, 0));
  try {
    actors::cluster_node intruder(opts(1, 2, sup.supervisor_port(), "guessed-token"));
    intruder.start();
    FAIL() << "a wrong token was accepted";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("wrong cluster token"), std::string::npos) << e.what();
  }
  // The real rank 1 still gets in afterwards.
  auto workers = start_workers(2, sup.supervisor_port());
  sup.start();
  EXPECT_EQ(sup.driver().wait_for_group(20000).members_size(), 2);
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  for (auto& w : workers) w->t.join();
}

TEST(ActorsCluster, LosingAMemberTearsTheGroupDownAndNamesIt) {
  actors::cluster_node sup(opts(0, 3, 0));
  register_handlers(sup);
  auto workers = start_workers(3, sup.supervisor_port(), [](int r) { return r == 2; });
  sup.start();
  sup.driver().wait_for_group(20000);
  Command loop;
  loop.set_id(7);
  loop.set_kind(Command::COLLECTIVE_LOOP);
  (*loop.mutable_args())["iterations"] = "4000";  // 20 s unless torn down
  const auto t0 = std::chrono::steady_clock::now();
  try {
    sup.driver().run(loop, 30000);
    FAIL() << "the command survived losing rank 2";
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::aborted);
    EXPECT_NE(std::string(e.what()).find("rank 2 (pid"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("lost"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(15));
  EXPECT_EQ(sup.wait(), actors::exit_group_torn_down);
  workers[0]->t.join();
  workers[1]->t.join();
  EXPECT_EQ(workers[0]->code, actors::exit_group_torn_down);
  EXPECT_NE(workers[0]->reason.find("rank 2"), std::string::npos) << workers[0]->reason;
  EXPECT_EQ(workers[1]->code, -2);
}

TEST(ActorsCluster, WithARestartLeftTheSurvivorsRebuildTheGroupAndFinish) {
  auto o = opts(0, 3, 0);
  o.max_restarts = 1;
  actors::cluster_node sup(o);
  register_handlers(sup);
  auto workers = start_workers(3, sup.supervisor_port(), [](int r) { return r == 2; });
  sup.start();
  sup.driver().wait_for_group(20000);
  Command loop;
  loop.set_id(8);
  loop.set_kind(Command::COLLECTIVE_LOOP);
  (*loop.mutable_args())["iterations"] = "200";  // 1 s: rank 2 leaves after 0.3 s
  const auto reports = sup.driver().run(loop, 30000);
  ASSERT_EQ(reports.size(), 2u);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(reports[static_cast<size_t>(r)].rank(), r);
    EXPECT_EQ(reports[static_cast<size_t>(r)].epoch(), 2);
    ASSERT_TRUE(reports[static_cast<size_t>(r)].ok()) << reports[static_cast<size_t>(r)].error();
    EXPECT_EQ(reports[static_cast<size_t>(r)].lines(0), fmt::format("done in epoch 2 as {} of 2", r));
  }
  // A second failure exceeds max_restarts=1 — here we just end cleanly.
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  for (auto& w : workers) w->t.join();
  EXPECT_EQ(workers[0]->code, 0);
}

// supervisor.h invariant 7: with keep_members the group outlives a lost member other than rank 0.
TEST(ActorsCluster, WithKeepMembersALostRankIsNamedToTheSurvivorsAndTheGroupGoesOn) {
  auto o = opts(0, 3, 0);
  o.keep_members = true;
  actors::cluster_node sup(o);
  register_handlers(sup);
  auto workers = start_workers(3, sup.supervisor_port(), [](int r) { return r == 2; });
  sup.start();
  sup.driver().wait_for_group(20000);
  Command c;
  c.set_id(9);
  c.set_kind(Command::SERVE);
  const auto reports = sup.driver().run(c, 30000);
  ASSERT_EQ(reports.size(), 2u) << "the survivors' reports; the lost rank has none";
  for (int r = 0; r < 2; ++r) {
    const auto& rep = reports[static_cast<size_t>(r)];
    EXPECT_EQ(rep.rank(), r);
    ASSERT_TRUE(rep.ok()) << rep.error();
    EXPECT_EQ(rep.lines(0), "heard 2; lost 2; aborted true; epoch 1; over false");
  }
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  for (auto& w : workers) w->t.join();
  EXPECT_EQ(workers[0]->code, 0);
}

// supervisor.h invariants 8 and 9: with open slots a process joins the group that is running
// its command late, gets the next rank, the group and the command; values it publishes reach the
// others, and it looks theirs up. A join past the open slots, or with the wrong token, is refused.
TEST(ActorsCluster, WithOpenSlotsAProcessJoinsTheRunningGroupLateAndFindsTheOthers) {
  auto o = opts(0, 2, 0);
  o.keep_members = true;
  o.open_slots = 2;
  actors::cluster_node sup(o);
  register_handlers(sup);
  auto workers = start_workers(2, sup.supervisor_port());
  sup.start();
  sup.driver().wait_for_group(20000);
  const int port = sup.supervisor_port();
  std::atomic<int> late_code[2] = {-1, -1}, late_rank[2] = {-1, -1};
  auto late_node = [&](int k, int delay_ms) {
    return std::thread([&, k, delay_ms] {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      auto lo = opts(0, 0, port);
      lo.late_join = true;
      actors::cluster_node node(lo);
      register_handlers(node);
      node.start();
      late_rank[k] = node.rank();
      late_code[k] = node.wait();
    });
  };
  std::thread early = late_node(0, 0);  // joins before the command starts: the command reaches it too
  while (late_rank[0] < 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::thread during = late_node(1, 200);  // joins while the command runs: it is sent the command then
  std::string refused_slot, refused_token;
  std::thread refused([&] {
    while (late_rank[1] < 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    for (const std::string token : {"s3cret-token", "wrong"}) {
      auto lo = opts(0, 0, port, token);
      lo.late_join = true;
      actors::cluster_node node(lo);
      try {
        node.start();
      } catch (const runtime::error& e) {
        (token == "wrong" ? refused_token : refused_slot) = e.what();
      }
    }
  });
  Command c;
  c.set_id(4);
  c.set_kind(Command::TRAIN);
  const auto reports = sup.driver().run(c, 30000);
  refused.join();
  ASSERT_EQ(reports.size(), 4u);
  for (const auto& rep : reports) ASSERT_TRUE(rep.ok()) << rep.error();
  EXPECT_EQ(reports[0].lines(0), "rank 0 = 0 of 2 in epoch 1; heard rank 2: true; looked up a2");
  EXPECT_EQ(reports[1].lines(0), "rank 1 = 1 of 2 in epoch 1; heard rank 2: true; looked up a2");
  EXPECT_EQ(reports[2].rank(), 2);
  EXPECT_EQ(reports[2].lines(0), "rank 2 = 2 of 3 in epoch 1; looked up a0,a1");
  EXPECT_EQ(reports[3].lines(0), "rank 3 = 3 of 4 in epoch 1; looked up a0,a1");
  EXPECT_NE(refused_slot.find("all 2 open slot(s) are taken"), std::string::npos) << refused_slot;
  EXPECT_NE(refused_token.find("wrong cluster token"), std::string::npos) << refused_token;
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  for (auto& w : workers) w->t.join();
  early.join();
  during.join();
  EXPECT_EQ(late_rank[0], 2);
  EXPECT_EQ(late_rank[1], 3);
  EXPECT_EQ(late_code[0], 0);
  EXPECT_EQ(late_code[1], 0);
}

TEST(ActorsCluster, AGroupWithoutOpenSlotsRefusesALateJoin) {
  auto o = opts(0, 1, 0);
  o.keep_members = true;
  actors::cluster_node sup(o);
  sup.start();
  sup.driver().wait_for_group(20000);
  auto lo = opts(0, 0, sup.supervisor_port());
  lo.late_join = true;
  actors::cluster_node node(lo);
  try {
    node.start();
    FAIL() << "a late join was accepted";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("takes no late joins (troupe-launch --open-slots N"), std::string::npos)
        << e.what();
  }
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
}

namespace {
// A throwaway CA and node certificates (EC P-256) made with the openssl CLI.
struct test_pki {
  std::string dir;
  bool ok = false;
  explicit test_pki(const std::string& name) {
    dir = ::testing::TempDir() + "troupe_pki_" + name + "_" + std::to_string(::getpid());
    const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string cmd =
        "set -e; rm -rf " + dir + "; mkdir -p " + dir + "; cd " + dir + "; " +
        "openssl req -x509 " + ec + " -keyout ca.key -out ca.pem -days 1 -subj /CN=troupe-test-ca 2>/dev/null; " +
        "for n in a b; do openssl req " + ec + " -keyout $n.key -out $n.csr -subj /CN=node-$n 2>/dev/null; " +
        "openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 1 2>/dev/null; done";
    ok = std::system(cmd.c_str()) == 0;
  }
  ~test_pki() { std::system(("rm -rf " + dir).c_str()); }
  actors::tls_options node(const std::string& n) const {
    return {dir + "/" + n + ".pem", dir + "/" + n + ".key", "", dir + "/ca.pem"};
  }
};
}  // namespace

TEST(ActorsCluster, OverTlsNodesWithCertificatesFromTheCaJoinAndOthersCannot) {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0) GTEST_SKIP() << "no openssl CLI to make certificates";
  test_pki pki("main"), other("other");
  ASSERT_TRUE(pki.ok && other.ok) << "openssl could not make test certificates";
  auto o0 = opts(0, 2, 0);
  o0.tls = pki.node("a");
  actors::cluster_node sup(o0);
  // A plain-TCP node and a node whose certificate another CA signed both fail to join.
  for (int variant = 0; variant < 2; ++variant) {
    auto o = opts(1, 2, sup.supervisor_port());
    o.join_timeout_ms = 1500;
    if (variant == 1) o.tls = other.node("b");
    try {
      actors::cluster_node intruder(o);
      intruder.start();
      ADD_FAILURE() << (variant ? "a foreign certificate" : "plain TCP") << " was let in";
    } catch (const runtime::error& e) {
      EXPECT_EQ(e.code(), runtime::errc::io) << e.what();
    }
  }
  std::atomic<int> code{-1};
  std::thread t([&] {
    auto o1 = opts(1, 2, sup.supervisor_port());
    o1.tls = pki.node("b");
    actors::cluster_node node(o1);
    node.start();
    code = node.wait();
  });
  sup.start();
  EXPECT_EQ(sup.driver().wait_for_group(20000).members_size(), 2);
  Command ping;
  ping.set_id(1);
  ping.set_kind(Command::PING);
  EXPECT_EQ(sup.driver().run(ping, 10000).size(), 2u);
  sup.driver().shutdown("test done", 0);
  EXPECT_EQ(sup.wait(), 0);
  t.join();
  EXPECT_EQ(code, 0);
}

TEST(ActorsCluster, TlsWithoutAKeyOrCaIsRefusedUpFront) {
  auto o = opts(0, 1, 0);
  o.tls.certificate = "/nonexistent/cert.pem";
  try {
    actors::cluster_node node(o);
    FAIL() << "TLS without a key and a CA must be refused";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("no peer is authenticated"), std::string::npos) << e.what();
  }
}
