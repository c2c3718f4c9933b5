// The NCCL communicator. Without a GPU (or without NCCL) the factory must refuse with
// errc::unsupported saying why. With GPUs: one thread per visible GPU (P = GPU count, the
// 1-rank group always), bootstrapped in process, passes the conformance suite on cuda
// buffers; wrong devices and mismatched all_to_all_v counts are errors; abort() unblocks
// a pending receive with the reason.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "runtime/bootstrap.h"
#include "runtime/communicator_check.h"
#include "runtime/communicator_nccl.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "tests/unit/expect_error.h"

using namespace troupe::runtime;

namespace {

using troupe_test::expect_error;

}  // namespace

#ifndef TROUPE_HAVE_NCCL

TEST(CommunicatorNccl, BuiltWithoutNcclSaysSo) {
  auto boots = make_inproc_bootstraps(1);
  const error e = expect_error([&] { make_nccl_communicator(*boots[0], 0); });
  EXPECT_EQ(e.code(), errc::unsupported) << e.what();
  EXPECT_NE(e.message().find("without NCCL"), std::string::npos) << e.what();
}

#else

namespace {

int gpu_count() {
  const cuda_state s = cuda_status();
  return s.available ? s.device_count : 0;
}

}  // namespace

// Runs here (no GPU): the factory refuses on every rank, naming the GPU it lacks, and
// no rank waits for another.
TEST(CommunicatorNccl, WithoutAGpuEveryRankIsToldWhy) {
  if (gpu_count() > 0) GTEST_SKIP() << "a GPU is visible; this checks the machine without one";
  const int P = 2;
  auto boots = make_inproc_bootstraps(P, 20000);
  std::vector<std::string> what(static_cast<size_t>(P));
  std::vector<errc> code(static_cast<size_t>(P), errc::internal);
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        make_nccl_communicator(*boots[static_cast<size_t>(r)], r);
        what[static_cast<size_t>(r)] = "no error";
      } catch (const error& e) {
        code[static_cast<size_t>(r)] = e.code();
        what[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < P; ++r) {
    const std::string& w = what[static_cast<size_t>(r)];
    EXPECT_EQ(code[static_cast<size_t>(r)], errc::unsupported) << "rank " << r << ": " << w;
    EXPECT_NE(w.find("no GPU"), std::string::npos) << "rank " << r << ": " << w;
    EXPECT_NE(w.find("cuda:0"), std::string::npos) << "rank " << r << ": " << w;
    EXPECT_NE(w.find("cuda:1"), std::string::npos) << "rank " << r << ": " << w;  // every rank's failure
  }
}

namespace {

// Runs body(rank, comm) on P threads, rank r driving cuda:r. Rethrows the first failure.
void run_ranks(int P, int timeout_ms, const std::function<void(int, communicator&)>& body) {
  auto boots = make_inproc_bootstraps(P, 60000);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(P));
  communicator_options o;
  o.timeout_ms = timeout_ms;
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        auto c = make_nccl_communicator(*boots[static_cast<size_t>(r)], r, o);
        body(r, *c);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Blocks until set() (no timing involved).
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

#define NEED_GPUS(n)                                                                                  \
  do {                                                                                                \
    if (gpu_count() < (n))                                                                            \
      GTEST_SKIP() << "needs " << (n) << " GPU(s), " << gpu_count() << " visible: " << cuda_status().reason; \
  } while (0)

}  // namespace

class CommunicatorNcclRanks : public ::testing::TestWithParam<int> {};

// P = 1 on any GPU machine; P = 2..8 where that many GPUs are visible (skipped otherwise).
TEST_P(CommunicatorNcclRanks, PassesTheConformanceSuite) {
  const int P = GetParam();
  NEED_GPUS(P);
  std::vector<std::string> summaries(static_cast<size_t>(P));
  std::vector<int> failed(static_cast<size_t>(P), -1);
  run_ranks(P, 60000, [&](int rank, communicator& c) {
    ASSERT_EQ(c.backend(), "nccl");
    ASSERT_EQ(c.size(), P);
    ASSERT_EQ(c.rank(), rank);
    comm_check_options o;
    o.dev = device::cuda(rank);
    o.bf16_sum_tolerance = P / 256.0;  // NCCL rounds every partial bf16 sum (communicator_nccl.h, 2)
    o.sizes = {1, 7, 4099, 300007};    // the last one crosses NCCL's protocol thresholds
    const auto results = check_communicator(c, o);
    int bad = 0;
    for (const auto& r : results) bad += r.ok ? 0 : 1;
    failed[static_cast<size_t>(rank)] = bad;
    summaries[static_cast<size_t>(rank)] = summarize(results, c);
  });
  for (int r = 0; r < P; ++r)
    EXPECT_EQ(failed[static_cast<size_t>(r)], 0) << "rank " << r << ": " << summaries[static_cast<size_t>(r)];
}

INSTANTIATE_TEST_SUITE_P(Gpus, CommunicatorNcclRanks, ::testing::Values(1, 2, 4, 8),
                         [](const auto& info) { return "P" + std::to_string(info.param); });

// Buffers on the cpu or on another GPU are refused, naming both devices; the group stays usable.
TEST(CommunicatorNccl, WrongDeviceIsAnInvalidArgument) {
  NEED_GPUS(1);
  run_ranks(1, 60000, [&](int, communicator& c) {
    tensor cpu = tensor::full({4}, 1.0);
    const error e = expect_error([&] { c.all_reduce(cpu, reduce_op::sum); });
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_NE(e.message().find("cuda:0"), std::string::npos) << e.what();
    EXPECT_NE(e.message().find("cpu"), std::string::npos) << e.what();
    tensor x = tensor::full({4}, 2.5).to(device::cuda(0));
    c.all_reduce(x, reduce_op::sum);
    EXPECT_EQ(x.to(device::cpu()).data<float>()[3], 2.5f);
  });
}

// Counts that disagree are errc::invalid_argument on every rank (no hang), naming the
// pair; the group stays in step and usable.
TEST(CommunicatorNccl, AllToAllVCountMismatchIsAnErrorOnEveryRank) {
  NEED_GPUS(2);
  run_ranks(2, 60000, [&](int rank, communicator& c) {
    const device d = device::cuda(rank);
    tensor send = tensor::zeros({8}, dtype::f32, d), recv = tensor::zeros({8}, dtype::f32, d);
    // Rank 1 expects 3 elements from rank 0, which sends 2.
    const std::vector<int64_t> sc{2, 2}, rc = rank == 1 ? std::vector<int64_t>{3, 2} : std::vector<int64_t>{2, 2};
    const error e = expect_error([&] { c.all_to_all_v(recv, rc, send, sc); });
    EXPECT_EQ(e.code(), errc::invalid_argument) << e.what();
    EXPECT_NE(e.message().find("rank 0 sends 2 elements to rank 1, but rank 1 expects 3"), std::string::npos) << e.what();
    tensor x = tensor::full({3}, 1.0 + rank).to(d);
    c.all_reduce(x, reduce_op::sum);
    EXPECT_EQ(x.to(device::cpu()).data<float>()[2], 3.0f);
  });
}

// abort() from another thread unblocks a receive nobody answers, with the reason; later
// operations throw errc::aborted too. The peer never joins, so only the abort can end it
// (the timeout is far longer than the test).
TEST(CommunicatorNccl, AbortUnblocksAPendingRecvWithTheReason) {
  NEED_GPUS(2);
  flag done;
  run_ranks(2, 600000, [&](int rank, communicator& c) {
    if (rank == 1) {
      done.wait();  // never sends; aborts too, so its destructor need not flush anything
      c.abort("test over");
      return;
    }
    std::thread supervisor([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // usually while recv waits; either way it must throw
      c.abort("supervisor: rank 1 was lost");
    });
    tensor t = tensor::zeros({4}, dtype::f32, device::cuda(0));
    const error e = expect_error([&] { c.recv(t, 1, 0); });
    supervisor.join();
    EXPECT_EQ(e.code(), errc::aborted) << e.what();
    EXPECT_NE(e.message().find("supervisor: rank 1 was lost"), std::string::npos) << e.what();
    const error later = expect_error([&] { c.barrier(); });
    EXPECT_EQ(later.code(), errc::aborted) << later.what();
    EXPECT_NE(later.message().find("supervisor: rank 1 was lost"), std::string::npos) << later.what();
    done.set();
  });
}

// One GPU suffices to see abort() end a pending op: a 1-rank group's ops complete at
// once, so abort first and check that the next op refuses with the reason.
TEST(CommunicatorNccl, AbortedCommunicatorRefusesLaterOps) {
  NEED_GPUS(1);
  run_ranks(1, 60000, [&](int, communicator& c) {
    c.barrier();
    std::thread other([&] { c.abort("gang teardown"); });
    other.join();
    tensor x = tensor::zeros({4}, dtype::f32, device::cuda(0));
    const error e = expect_error([&] { c.all_reduce(x, reduce_op::sum); });
    EXPECT_EQ(e.code(), errc::aborted) << e.what();
    EXPECT_NE(e.message().find("gang teardown"), std::string::npos) << e.what();
    EXPECT_NE(e.message().find("all_reduce"), std::string::npos) << e.what();
  });
}

#endif  // TROUPE_HAVE_NCCL
