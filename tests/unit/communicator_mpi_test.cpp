// The MPI communicator and bootstrap. Meant for `mpirun -np P` (ctest runs it with P = 2
// and 4); started alone it is a 1-rank world, and the tests that need a peer skip.
// Every test is collective: all ranks run the same tests in the same order, and each
// test builds its own communicator (MPI_Comm_dup), so a broken one never leaks into the
// next test.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "runtime/communicator_check.h"
#include "runtime/communicator_mpi.h"
#include "runtime/error.h"

using namespace troupe::runtime;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

#ifndef TROUPE_HAVE_MPI

TEST(CommunicatorMpi, BuiltWithoutMpiSaysSo) {
  EXPECT_FALSE(mpi_session::available());
  for (int i = 0; i < 2; ++i) {
    try {
      if (i == 0) make_mpi_communicator();
      else make_mpi_bootstrap();
      FAIL() << "expected errc::unsupported";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::unsupported);
      EXPECT_TRUE(contains(e.what(), "built without MPI")) << e.what();
    }
  }
}

#else

namespace {

// One mpi_session for the whole test program (MPI cannot start twice in a process).
class mpi_environment : public ::testing::Environment {
 public:
  void SetUp() override { session = std::make_unique<mpi_session>(); }
  void TearDown() override { session.reset(); }
  static inline std::unique_ptr<mpi_session> session;
};
[[maybe_unused]] ::testing::Environment* const mpi_env = ::testing::AddGlobalTestEnvironment(new mpi_environment);

int world_size() { return mpi_environment::session->size(); }
int world_rank() { return mpi_environment::session->rank(); }

std::unique_ptr<communicator> make_comm(int timeout_ms = 20000) {
  communicator_options o;
  o.timeout_ms = timeout_ms;
  return make_mpi_communicator(o);
}

// Forwards everything to `inner`, but adds 1 to element 3 of the results of
// all_reduce(sum) on i32 tensors of 7 elements: exactly one check of the suite.
class corrupting_communicator final : public communicator {
 public:
  explicit corrupting_communicator(communicator& inner) : in_(inner) {}
  int rank() const override { return in_.rank(); }
  int size() const override { return in_.size(); }
  std::string backend() const override { return in_.backend() + "+corrupt"; }
  void all_reduce(tensor& t, reduce_op op) override {
    in_.all_reduce(t, op);
    if (op == reduce_op::sum && t.dtype() == dtype::i32 && t.numel() == 7) t.data<int32_t>()[3] += 1;
  }
  void reduce_scatter(tensor& out, const tensor& in, reduce_op op) override { in_.reduce_scatter(out, in, op); }
  void all_gather(tensor& out, const tensor& in) override { in_.all_gather(out, in); }
  void all_to_all_v(tensor& recv, const std::vector<int64_t>& rc, const tensor& send,
                    const std::vector<int64_t>& sc) override {
    in_.all_to_all_v(recv, rc, send, sc);
  }
  void broadcast(tensor& t, int root) override { in_.broadcast(t, root); }
  void send(const tensor& t, int peer, int tag) override { in_.send(t, peer, tag); }
  void recv(tensor& t, int peer, int tag) override { in_.recv(t, peer, tag); }
  void barrier() override { in_.barrier(); }
  void abort(const std::string& reason) override { in_.abort(reason); }

 private:
  communicator& in_;
};

}  // namespace

TEST(CommunicatorMpi, SessionSeesTheWorld) {
  EXPECT_TRUE(mpi_session::available());
  auto comm = make_comm();
  EXPECT_EQ(comm->backend(), "mpi");
  EXPECT_EQ(comm->size(), world_size());
  EXPECT_EQ(comm->rank(), world_rank());
  if (world_size() > 1) {
    EXPECT_TRUE(mpi_session::launched_by_mpirun());
  }
}

TEST(CommunicatorMpi, PassesTheConformanceSuite) {
  auto comm = make_comm();
  comm_check_options o;
  // 20002: large enough (> 32 KiB) for the two-phase all_reduce with P > 2, and not
  // divisible by 3 or 4; 1: fewer elements than ranks.
  o.sizes = {1, 7, 4099, 20002};
  const auto results = check_communicator(*comm, o);
  ASSERT_GE(results.size(), 40u);
  for (const auto& r : results) EXPECT_TRUE(r.ok) << r.name << ": " << r.detail;
  std::printf("rank %d: %s\n", comm->rank(), summarize(results, *comm).c_str());
}

TEST(CommunicatorMpi, SuiteCatchesOneCorruptedElement) {
  auto comm = make_comm();
  corrupting_communicator bad(*comm);
  const auto results = check_communicator(bad);
  std::vector<std::string> failed;
  for (const auto& r : results)
    if (!r.ok) failed.push_back(r.name + ": " + r.detail);
  ASSERT_EQ(failed.size(), 1u) << summarize(results, bad);
  EXPECT_TRUE(contains(failed[0], "all_reduce sum i32 n=7: element 3: got")) << failed[0];
}

TEST(CommunicatorMpi, AbortFromAnotherThreadUnblocksAPendingRecv) {
  if (world_size() < 2) GTEST_SKIP() << "needs a peer: run under mpirun -np 2";
  auto comm = make_comm();
  const int peer = (world_rank() + 1) % world_size();
  std::thread supervisor([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    comm->abort("supervisor: rank 7 died");
  });
  tensor t = tensor::zeros({16});
  try {
    comm->recv(t, peer, 5);  // nobody sends this
    ADD_FAILURE() << "recv returned without a message";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::aborted) << e.what();
    EXPECT_TRUE(contains(e.what(), "supervisor: rank 7 died")) << e.what();
  }
  supervisor.join();
  // Every later operation fails the same way, collectives included.
  for (int i = 0; i < 2; ++i) {
    try {
      if (i == 0) comm->barrier();
      else comm->all_reduce(t, reduce_op::sum);
      ADD_FAILURE() << "operation " << i << " ran after abort";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::aborted) << e.what();
      EXPECT_TRUE(contains(e.what(), "supervisor: rank 7 died")) << e.what();
    }
  }
  make_comm()->barrier();
}

TEST(CommunicatorMpi, TimeoutNamesTheSilentPeer) {
  if (world_size() < 2) GTEST_SKIP() << "needs a peer: run under mpirun -np 2";
  const int P = world_size(), me = world_rank();
  {
    auto comm = make_comm(300);
    const int peer = (me + 1) % P;
    tensor t = tensor::zeros({4});
    try {
      comm->recv(t, peer, 9);  // nobody sends this
      ADD_FAILURE() << "recv returned without a message";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::io) << e.what();
      EXPECT_TRUE(contains(e.what(), fmt::format("from rank {} (tag 9)", peer))) << e.what();
    }
  }
  {
    // Rank 0 enters a barrier that nobody else joins: it names every other rank.
    auto comm = make_comm(300);
    if (me == 0) {
      std::string want = "1";
      for (int r = 2; r < P; ++r) want += fmt::format(", {}", r);
      try {
        comm->barrier();
        ADD_FAILURE() << "barrier completed with ranks missing";
      } catch (const error& e) {
        EXPECT_EQ(e.code(), errc::io) << e.what();
        EXPECT_TRUE(contains(e.what(), "barrier: rank 0 waited 300 ms; no data from rank(s) " + want)) << e.what();
      }
    }
  }
  make_comm()->barrier();
}

TEST(CommunicatorMpi, RecvOfTheWrongSizeIsRejectedAndTheCommKeepsWorking) {
  if (world_size() < 2) GTEST_SKIP() << "needs a peer: run under mpirun -np 2";
  auto comm = make_comm();
  const int me = world_rank();
  if (me == 0) {
    comm->send(tensor::full({5}, 1.5), 1, 3);
    comm->send(tensor::full({4}, 2.5), 1, 3);
  } else if (me == 1) {
    tensor t = tensor::zeros({4});
    try {
      comm->recv(t, 0, 3);
      ADD_FAILURE() << "a 5-element message landed in a 4-element tensor";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
      EXPECT_TRUE(contains(e.what(), "rank 0 sent 20 bytes (tag 3) but rank 1 expects 16")) << e.what();
    }
    EXPECT_EQ(t.data<float>()[0], 0.f);  // untouched
    comm->recv(t, 0, 3);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(t.data<float>()[i], 2.5f);
  }
  // Collectives with mismatched counts: rank 1 expects one element too many from rank 0.
  const int P = world_size();
  std::vector<int64_t> sc(static_cast<size_t>(P), 2), rc(static_cast<size_t>(P), 2);
  if (me == 1) rc[0] = 3;
  tensor send = tensor::full({2 * P}, 1.0), recv = tensor::zeros({2 * P + 1});
  try {
    comm->all_to_all_v(recv, rc, send, sc);
    EXPECT_NE(me, 1) << "rank 1 accepted 2 elements where it expected 3";
  } catch (const error& e) {
    EXPECT_EQ(me, 1) << e.what();
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_TRUE(contains(e.what(), "all_to_all_v: rank 0 sent 2 elements but rank 1 expects 3")) << e.what();
  }
  // And one element too few: rank 0 sends 2, rank 1 has room for 1 (MPI truncation).
  rc.assign(static_cast<size_t>(P), 2);
  if (me == 1) rc[0] = 1;
  try {
    comm->all_to_all_v(recv, rc, send, sc);
    EXPECT_NE(me, 1) << "rank 1 accepted 2 elements where it expected 1";
  } catch (const error& e) {
    EXPECT_EQ(me, 1) << e.what();
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_TRUE(contains(e.what(), "all_to_all_v: rank 0 sent more than the 1 elements rank 1 expects")) << e.what();
  }
  tensor x = tensor::full({3}, 1.0);
  comm->all_reduce(x, reduce_op::sum);
  EXPECT_EQ(x.data<float>()[2], static_cast<float>(P));
}

TEST(CommunicatorMpi, BootstrapGathersBlobsOfDifferentSizes) {
  auto boot = make_mpi_bootstrap(20000);
  const int P = boot->size(), me = boot->rank();
  EXPECT_EQ(P, world_size());
  // Rank r's blob: 1000*r + 3 bytes of a rank-specific pattern; rank 1's is empty.
  auto blob = [](int r) {
    if (r == 1) return std::string();
    std::string s(static_cast<size_t>(1000 * r + 3), '\0');
    for (size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>((i * 31 + static_cast<size_t>(r) * 7) & 0xff);
    return s;
  };
  for (int round = 0; round < 2; ++round) {
    const auto all = boot->all_gather(blob(me));
    ASSERT_EQ(all.size(), static_cast<size_t>(P));
    for (int r = 0; r < P; ++r) EXPECT_EQ(all[static_cast<size_t>(r)], blob(r)) << "blob of rank " << r;
  }
}

#endif  // TROUPE_HAVE_MPI
