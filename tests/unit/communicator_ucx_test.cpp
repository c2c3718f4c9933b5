// The UCX communicator: ranks are threads of this process, each with its own UCP
// context and worker, bootstrapped in process. The conformance suite on 1-4 ranks over
// TCP (loopback only) and over shared memory; exact bytes through put/get; abort,
// timeouts, wrong sizes and a vanished peer fail loudly and name the peer.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <thread>

#include "runtime/bootstrap.h"
#include "runtime/communicator_check.h"
#include "runtime/communicator_ucx.h"
#include "runtime/error.h"
#include "tests/unit/expect_error.h"

using namespace troupe::runtime;

#ifndef TROUPE_HAVE_UCX

TEST(CommunicatorUcx, BuiltWithoutUcxSaysSo) {
  auto boots = make_inproc_bootstraps(1);
  try {
    make_ucx_communicator(*boots[0]);
    FAIL() << "expected errc::unsupported";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::unsupported);
    EXPECT_NE(std::string(e.what()).find("without UCX"), std::string::npos) << e.what();
  }
}

#else

namespace {

struct transport {
  const char* name;
  const char* tls;
};
// TCP restricted to the loopback device; shared memory between the threads' workers
// (posix or sysv segments for messages, cma for large copies).
const transport tcp{"tcp", "tcp"};
const transport shm{"shm", "posix,cma,self"};
const transport sysv{"sysv", "sysv,cma,self"};
void PrintTo(const transport& t, std::ostream* os) { *os << t.name << " (UCX_TLS " << t.tls << ")"; }

ucx_options options_for(const transport& t, int timeout_ms) {
  ucx_options o;
  o.timeout_ms = timeout_ms;
  o.transports = t.tls;
  o.net_devices = "lo";
  return o;
}

// Runs body(rank, comm) on P threads, each with its own UCX communicator. Returns a
// reason when the transports are unavailable here (every rank reports unsupported);
// rethrows the first other failure.
std::string run_ranks(int P, const ucx_options& o, const std::function<void(int, ucx_communicator&)>& body) {
  auto boots = make_inproc_bootstraps(P, 20000);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(P));
  std::vector<std::string> unsupported(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        std::unique_ptr<ucx_communicator> c;
        try {
          c = make_ucx_communicator(*boots[static_cast<size_t>(r)], o);
        } catch (const error& e) {
          if (e.code() != errc::unsupported) throw;
          unsupported[static_cast<size_t>(r)] = e.what();
          return;
        }
        body(r, *c);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (auto& u : unsupported)
    if (!u.empty()) return u;
  return "";
}

// The body is the variadic part: a lambda's commas would split a plain argument.
#define RUN_RANKS_OR_SKIP(P, o, ...)                                                       \
  do {                                                                                     \
    const std::string why_ = run_ranks((P), (o), __VA_ARGS__);                             \
    if (!why_.empty()) GTEST_SKIP() << "UCX transports '" << (o).transports << "' unavailable here: " << why_; \
  } while (0)

// Blocks until set() (lets one rank outlive another's checks; no timing involved).
class flag {
 public:
  void set() {
    std::lock_guard<std::mutex> g(mu_);
    on_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return on_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool on_ = false;
};

using troupe_test::expect_error;

}  // namespace

class CommunicatorUcx : public ::testing::TestWithParam<std::tuple<transport, int>> {};

TEST_P(CommunicatorUcx, PassesTheConformanceSuite) {
  const auto [tr, P] = GetParam();
  std::vector<std::string> summaries(static_cast<size_t>(P));
  std::vector<int> failed(static_cast<size_t>(P), -1);
  RUN_RANKS_OR_SKIP(P, options_for(tr, 20000), [&](int rank, ucx_communicator& c) {
    ASSERT_EQ(c.backend(), "ucx");
    ASSERT_EQ(c.size(), P);
    ASSERT_EQ(c.rank(), rank);
    const auto results = check_communicator(c);
    int bad = 0;
    for (const auto& r : results) bad += r.ok ? 0 : 1;
    failed[static_cast<size_t>(rank)] = bad;
    summaries[static_cast<size_t>(rank)] = summarize(results, c);
  });
  for (int r = 0; r < P; ++r) EXPECT_EQ(failed[static_cast<size_t>(r)], 0) << "rank " << r << ": " << summaries[static_cast<size_t>(r)];
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommunicatorUcx,
                         ::testing::Combine(::testing::Values(tcp, shm, sysv), ::testing::Values(1, 2, 3, 4)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param).name) + "_P" +
                                  std::to_string(std::get<1>(info.param));
                         });

class CommunicatorUcxTransport : public ::testing::TestWithParam<transport> {};

// Messages of megabytes go through UCX's rendezvous protocol (zero-copy over cma for
// shared memory) rather than eager copies; the suite must hold there too.
TEST_P(CommunicatorUcxTransport, LargeMessagesPassTheConformanceSuite) {
  const int P = 3;
  std::vector<std::string> bad(static_cast<size_t>(P));
  RUN_RANKS_OR_SKIP(P, options_for(GetParam(), 20000), [&](int rank, ucx_communicator& c) {
    comm_check_options o;
    o.sizes = {300007};
    const auto results = check_communicator(c, o);
    for (const auto& r : results)
      if (!r.ok) bad[static_cast<size_t>(rank)] = summarize(results, c);
  });
  for (int r = 0; r < P; ++r) EXPECT_EQ(bad[static_cast<size_t>(r)], "") << "rank " << r;
}

// Rank 0 writes 1000 bytes into rank 1's region at an odd offset and reads 500 back
// from elsewhere; rank 1 sees exactly those bytes and nothing else changed.
TEST_P(CommunicatorUcxTransport, PutAndGetMoveExactBytes) {
  const transport tr = GetParam();
  const size_t region_bytes = 4096, put_at = 123, put_n = 1000, get_at = 3001, get_n = 500;
  auto initial = [](size_t i) { return static_cast<uint8_t>(i * 31 + 7); };
  auto written = [](size_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); };
  RUN_RANKS_OR_SKIP(2, options_for(tr, 20000), [&](int rank, ucx_communicator& c) {
    tensor mem = tensor::zeros({static_cast<int64_t>(region_bytes)}, dtype::u8);
    if (rank == 1)
      for (size_t i = 0; i < region_bytes; ++i) mem.data<uint8_t>()[i] = initial(i);
    memory_region mine = c.register_memory(mem);
    ASSERT_TRUE(mine.valid());
    ASSERT_EQ(mine.nbytes(), region_bytes);
    const auto regions = c.exchange_regions(mine);
    ASSERT_EQ(regions.size(), 2u);
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(regions[static_cast<size_t>(r)].rank, r);
      EXPECT_EQ(regions[static_cast<size_t>(r)].nbytes, region_bytes);
    }
    if (rank == 0) {
      tensor src = tensor::empty({static_cast<int64_t>(put_n)}, dtype::u8);
      for (size_t i = 0; i < put_n; ++i) src.data<uint8_t>()[i] = written(i);
      c.put(src, 1, regions[1], put_at);
      c.flush(1);
      tensor got = tensor::zeros({static_cast<int64_t>(get_n)}, dtype::u8);
      c.get(got, 1, regions[1], get_at);
      for (size_t i = 0; i < get_n; ++i) ASSERT_EQ(got.data<uint8_t>()[i], initial(get_at + i)) << "get byte " << i;
      // Into our own region (no endpoint involved).
      c.put(src.slice(0, 0, 10), 0, regions[0], 5);
      for (size_t i = 0; i < 10; ++i) ASSERT_EQ(mem.data<uint8_t>()[5 + i], written(i));
      const error e = expect_error([&] { c.put(src, 1, regions[1], region_bytes - put_n + 1); });
      EXPECT_EQ(e.code(), errc::out_of_range) << e.what();
    }
    c.barrier();
    if (rank == 1)
      for (size_t i = 0; i < region_bytes; ++i) {
        const bool in_put = i >= put_at && i < put_at + put_n;
        ASSERT_EQ(mem.data<uint8_t>()[i], in_put ? written(i - put_at) : initial(i)) << "region byte " << i;
      }
    c.barrier();  // rank 0 is done reading before rank 1 unmaps
  });
}

// A receive that nobody answers throws errc::io naming the peer after timeout_ms; it does
// not consume a message, so a late send is still received.
TEST_P(CommunicatorUcxTransport, RecvTimeoutNamesThePeerAndLeavesTheGroupUsable) {
  flag timed_out, sent;
  RUN_RANKS_OR_SKIP(2, options_for(GetParam(), 300), [&](int rank, ucx_communicator& c) {
    if (rank == 0) {
      tensor t = tensor::zeros({8});
      const error e = expect_error([&] { c.recv(t, 1, 9); });
      timed_out.set();
      EXPECT_EQ(e.code(), errc::io) << e.what();
      EXPECT_NE(e.message().find("recv"), std::string::npos) << e.what();
      EXPECT_NE(e.message().find("rank 1"), std::string::npos) << e.what();
      sent.wait();
      c.recv(t, 1, 9);
      for (int i = 0; i < 8; ++i) EXPECT_EQ(t.data<float>()[i], 0.5f * static_cast<float>(i));
    } else {
      timed_out.wait();
      tensor t = tensor::empty({8});
      for (int i = 0; i < 8; ++i) t.data<float>()[i] = 0.5f * static_cast<float>(i);
      c.send(t, 0, 9);
      sent.set();
    }
    c.barrier();
  });
}

// A message of the wrong size is errc::invalid_argument naming both ranks, for point to
// point (longer and shorter) and for a collective; the group stays in step afterwards.
TEST_P(CommunicatorUcxTransport, WrongSizesAreInvalidArguments) {
  RUN_RANKS_OR_SKIP(2, options_for(GetParam(), 20000), [&](int rank, ucx_communicator& c) {
    if (rank == 1) {
      c.send(tensor::zeros({10}), 0, 3);
      c.send(tensor::zeros({4}), 0, 3);
      c.send(tensor::full({8}, 2.0), 0, 3);
    } else {
      tensor t = tensor::zeros({8});
      for (int k = 0; k < 2; ++k) {
        const error e = expect_error([&] { c.recv(t, 1, 3); });
        EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
        EXPECT_NE(e.message().find("rank 1 sent"), std::string::npos) << e.what();
        EXPECT_NE(e.message().find("rank 0 expects 32"), std::string::npos) << e.what();
      }
      c.recv(t, 1, 3);
      EXPECT_EQ(t.data<float>()[7], 2.0f);
    }
    tensor in = tensor::zeros({3 + rank}), out = tensor::zeros({2 * (3 + rank)});
    const error e = expect_error([&] { c.all_gather(out, in); });
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_NE(e.message().find(fmt::format("rank {} sent", 1 - rank)), std::string::npos) << e.what();
    tensor x = tensor::full({5}, 1.0 + rank);
    c.all_reduce(x, reduce_op::sum);
    EXPECT_EQ(x.data<float>()[4], 3.0f);
  });
}

// sleep_when_idle: a wait that sees nothing for 2 ms sleeps on the worker's event fd; a message sent
// 50 ms later still arrives whole (the event wakes it), the conformance suite passes, and a
// collective that had to sleep completes.
TEST_P(CommunicatorUcxTransport, SleepingWhenIdleStillDeliversEverything) {
  ucx_options o = options_for(GetParam(), 20000);
  o.sleep_when_idle = true;
  std::vector<int> failed(2, -1);
  RUN_RANKS_OR_SKIP(2, o, [&](int rank, ucx_communicator& c) {
    tensor x = tensor::zeros({1000});
    if (rank == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      for (int i = 0; i < 1000; ++i) x.data<float>()[i] = static_cast<float>(i);
      c.send(x, 1, 7);
    } else {
      c.recv(x, 0, 7);
      for (int i = 0; i < 1000; i += 111) EXPECT_EQ(x.data<float>()[i], static_cast<float>(i));
    }
    tensor b = tensor::from_vector(std::vector<int64_t>{rank == 0 ? 5 : 0}, {1});
    if (rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(30));  // rank 0 waits, asleep
    c.broadcast(b, 0);
    EXPECT_EQ(b.data<int64_t>()[0], 5);
    int bad = 0;
    for (const auto& r : check_communicator(c)) bad += r.ok ? 0 : 1;
    failed[static_cast<size_t>(rank)] = bad;
  });
  EXPECT_EQ(failed, (std::vector<int>{0, 0}));
}

INSTANTIATE_TEST_SUITE_P(Transports, CommunicatorUcxTransport, ::testing::Values(tcp, shm, sysv),
                         [](const auto& info) { return std::string(info.param.name); });

// abort() from another thread unblocks a pending receive with the reason, and every
// later operation throws errc::aborted too.
TEST(CommunicatorUcxFailures, AbortUnblocksAPendingRecvWithTheReason) {
  flag done;
  RUN_RANKS_OR_SKIP(2, options_for(tcp, 20000), [&](int rank, ucx_communicator& c) {
    if (rank == 1) {
      done.wait();
      return;
    }
    std::thread supervisor([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // usually while recv waits; either way it must throw
      c.abort("supervisor: rank 1 was lost");
    });
    tensor t = tensor::zeros({4});
    const error e = expect_error([&] { c.recv(t, 1, 1); });
    supervisor.join();
    EXPECT_EQ(e.code(), errc::aborted) << e.what();
    EXPECT_NE(e.message().find("supervisor: rank 1 was lost"), std::string::npos) << e.what();
    const error later = expect_error([&] { c.send(t, 1, 1); });
    EXPECT_EQ(later.code(), errc::aborted) << later.what();
    const error coll = expect_error([&] { c.barrier(); });
    EXPECT_EQ(coll.code(), errc::aborted) << coll.what();
    EXPECT_NE(coll.message().find("supervisor: rank 1 was lost"), std::string::npos) << coll.what();
    done.set();
  });
}

// Abort while a collective has large sends in flight (rendezvous: they wait for the
// peer): the transfers are cancelled before the call returns, so the caller may free
// its buffers, and the peer that never joined sees its endpoint fail, not a hang.
TEST(CommunicatorUcxFailures, AbortDuringACollectiveCancelsItsTransfers) {
  flag aborted;
  RUN_RANKS_OR_SKIP(2, options_for(tcp, 20000), [&](int rank, ucx_communicator& c) {
    if (rank == 1) {
      aborted.wait();
      tensor t = tensor::zeros({4});
      const error e = expect_error([&] { c.recv(t, 0, 2); });  // rank 0 closed its endpoint
      EXPECT_EQ(e.code(), errc::io) << e.what();
      EXPECT_NE(e.message().find("rank 0"), std::string::npos) << e.what();
      return;
    }
    std::thread supervisor([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      c.abort("gang teardown");
    });
    {
      tensor in = tensor::full({1 << 20}, 1.0), out = tensor::zeros({2 << 20});
      const error e = expect_error([&] { c.all_gather(out, in); });
      EXPECT_EQ(e.code(), errc::aborted) << e.what();
      EXPECT_NE(e.message().find("all_gather"), std::string::npos) << e.what();
      EXPECT_NE(e.message().find("gang teardown"), std::string::npos) << e.what();
    }  // buffers freed here
    supervisor.join();
    aborted.set();
  });
}

// A peer that goes away while this rank waits on it is an error naming that peer, found
// through UCX's endpoint error handling (the timeout is far longer than the test).
TEST(CommunicatorUcxFailures, VanishedPeerIsAnErrorNamingIt) {
  flag gone;
  RUN_RANKS_OR_SKIP(2, options_for(tcp, 60000), [&](int rank, ucx_communicator& c) {
    if (rank == 1) return;  // destroys its communicator: endpoints and worker close
    tensor t = tensor::zeros({4});
    const error e = expect_error([&] { c.recv(t, 1, 1); });
    EXPECT_EQ(e.code(), errc::io) << e.what();
    EXPECT_NE(e.message().find("peer rank 1 failed"), std::string::npos) << e.what();
    const error later = expect_error([&] { c.send(t, 1, 1); });
    EXPECT_EQ(later.code(), errc::io) << later.what();
    EXPECT_NE(later.message().find("rank 1"), std::string::npos) << later.what();
  });
}

// A group that grows (invariant 9): two ranks made together, then ranks 2 and 3 join alone. Each
// publishes its worker address in a directory the resolver reads (the supervisor's part in troupe
// serve). Messages go every way: old to new (the sender meets the joiner on first use), new to old,
// and joiner to joiner; a rank whose address never comes is an error naming it; without a resolver
// a rank past the group is still refused.
class GrowingUcx : public ::testing::TestWithParam<transport> {};

TEST_P(GrowingUcx, RanksThatJoinLaterReachAndAreReachedByEveryone) {
  std::mutex mu;
  std::condition_variable cv;
  std::map<int, std::string> directory;
  ucx_options o = options_for(GetParam(), 20000);
  o.resolve_peer = [&](int rank) {
    std::unique_lock<std::mutex> l(mu);
    if (rank >= 4 || !cv.wait_for(l, std::chrono::seconds(10), [&] { return directory.count(rank) > 0; }))
      TROUPE_THROW(errc::io, "rank {} never published its address", rank);
    return directory[rank];
  };
  auto publish = [&](int rank, const std::string& addr) {
    std::lock_guard<std::mutex> g(mu);
    directory[rank] = addr;
    cv.notify_all();
  };
  auto value = [](int from, int to) { return static_cast<float>(100 * from + to); };
  auto send_to = [&](communicator& c, int to) { c.send(tensor::from_vector(std::vector<float>{value(c.rank(), to)}, {1}), to, 3); };
  auto recv_from = [&](communicator& c, int from) {
    tensor t = tensor::zeros({1});
    c.recv(t, from, 3);
    return t.data<float>()[0];
  };
  std::vector<std::map<int, float>> got(4);
  std::vector<int> sizes(4, 0);
  std::vector<std::exception_ptr> errors(4);
  std::string unsupported;
  auto body = [&](int rank, communicator& c) {
    const int P = 4;
    for (int to = 0; to < P; ++to)  // everyone sends to everyone (eager: small messages)
      if (to != rank) send_to(c, to);
    for (int from = 0; from < P; ++from)
      if (from != rank) got[static_cast<size_t>(rank)][from] = recv_from(c, from);
    sizes[static_cast<size_t>(rank)] = c.size();
  };
  auto boots = make_inproc_bootstraps(2, 20000);
  std::barrier done(4);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      try {
        std::unique_ptr<ucx_communicator> c;
        try {
          c = r < 2 ? make_ucx_communicator(*boots[static_cast<size_t>(r)], o) : make_ucx_joining_communicator(r, o);
        } catch (const error& e) {
          if (e.code() != errc::unsupported) throw;
          std::lock_guard<std::mutex> g(mu);
          unsupported = e.what();
          publish(r, "");
          return;
        }
        EXPECT_EQ(c->size(), r < 2 ? 2 : r + 1);
        publish(r, c->address());
        body(r, *c);
        if (r == 0) {  // a rank that never comes: the resolver's error, naming it
          const error e = expect_error([&] { send_to(*c, 9); });
          EXPECT_EQ(e.code(), errc::io) << e.what();
          EXPECT_NE(e.message().find("rank 9"), std::string::npos) << e.what();
          EXPECT_EQ(c->size(), 4);
        }
        const error coll = expect_error([&] { c->barrier(); });  // not the same group on every rank
        EXPECT_EQ(coll.code(), errc::invalid_argument) << coll.what();
        EXPECT_NE(coll.message().find("point-to-point only"), std::string::npos) << coll.what();
        done.arrive_and_wait();  // the endpoints close together, as the ranks of a service do
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  if (!unsupported.empty()) GTEST_SKIP() << "UCX transports '" << o.transports << "' unavailable here: " << unsupported;
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (int r = 0; r < 4; ++r) {
    for (int from = 0; from < 4; ++from)
      if (from != r) {
        EXPECT_EQ(got[static_cast<size_t>(r)][from], value(from, r)) << "rank " << r << " from " << from;
      }
    EXPECT_EQ(sizes[static_cast<size_t>(r)], 4) << "rank " << r;
  }
}

TEST_P(GrowingUcx, WithoutAResolverARankPastTheGroupIsRefused) {
  RUN_RANKS_OR_SKIP(2, options_for(GetParam(), 20000), [&](int rank, ucx_communicator& c) {
    if (rank != 0) return;
    const error e = expect_error([&] { c.send(tensor::zeros({1}), 2, 3); });
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_NE(e.message().find("bad peer 2"), std::string::npos) << e.what();
    const error j = expect_error([&] { make_ucx_joining_communicator(2, options_for(GetParam(), 20000)); });
    EXPECT_EQ(j.code(), errc::invalid_argument) << j.what();
    EXPECT_NE(j.message().find("resolve_peer"), std::string::npos) << j.what();
  });
}

INSTANTIATE_TEST_SUITE_P(Transports, GrowingUcx, ::testing::Values(tcp, shm),
                         [](const auto& info) { return std::string(info.param.name); });

#endif  // TROUPE_HAVE_UCX
