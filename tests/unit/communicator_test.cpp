// The in-process communicator: every collective against a locally computed reference,
// exactly for integers, on 1-4 ranks (threads); mismatches and absent ranks fail loudly.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <thread>

#include "runtime/bootstrap.h"
#include "runtime/communicator.h"
#include "runtime/communicator_check.h"
#include "runtime/error.h"

using namespace troupe::runtime;

namespace {
// Runs body(rank, comm) on `P` threads; rethrows the first failure.
void run_ranks(int P, const std::function<void(int, communicator&)>& body, int timeout_ms = 20000) {
  auto group = make_inproc_group(P, timeout_ms);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r, *group[static_cast<size_t>(r)]);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

int64_t value(int rank, int64_t i) { return (rank + 1) * 1000003 + i * 7919 - 50000; }
}  // namespace

class CommunicatorRanks : public ::testing::TestWithParam<int> {};

TEST_P(CommunicatorRanks, AllReduceSumAndMaxExactForIntegers) {
  const int P = GetParam();
  const int64_t n = 1001;
  run_ranks(P, [&](int rank, communicator& c) {
    tensor s = tensor::empty({n}, dtype::i64), m = tensor::empty({n}, dtype::i64);
    for (int64_t i = 0; i < n; ++i) s.data<int64_t>()[i] = m.data<int64_t>()[i] = value(rank, i) * (i % 2 ? 1 : -1);
    c.all_reduce(s, reduce_op::sum);
    c.all_reduce(m, reduce_op::max);
    for (int64_t i = 0; i < n; ++i) {
      int64_t want_sum = 0, want_max = INT64_MIN;
      for (int r = 0; r < P; ++r) {
        const int64_t v = value(r, i) * (i % 2 ? 1 : -1);
        want_sum += v;
        want_max = std::max(want_max, v);
      }
      ASSERT_EQ(s.data<int64_t>()[i], want_sum) << "rank " << rank << " i " << i;
      ASSERT_EQ(m.data<int64_t>()[i], want_max);
    }
  });
}

TEST_P(CommunicatorRanks, AllReduceFloatIsRankOrderedAndIdenticalOnEveryRank) {
  const int P = GetParam();
  const int64_t n = 513;
  std::vector<std::vector<float>> results(static_cast<size_t>(P));
  std::vector<std::vector<uint16_t>> bf(static_cast<size_t>(P));
  run_ranks(P, [&](int rank, communicator& c) {
    tensor t = tensor::empty({n}), b = tensor::empty({n}, dtype::bf16);
    for (int64_t i = 0; i < n; ++i) {
      static_cast<float*>(t.data_ptr())[i] = 0.1f * static_cast<float>(value(rank, i) % 997) / 3.0f;
      static_cast<uint16_t*>(b.data_ptr())[i] = f32_to_bf16(static_cast<float>(value(rank, i) % 61) / 8.0f);
    }
    c.all_reduce(t, reduce_op::sum);
    c.all_reduce(b, reduce_op::sum);
    results[static_cast<size_t>(rank)].assign(t.data<float>(), t.data<float>() + n);
    bf[static_cast<size_t>(rank)].assign(static_cast<uint16_t*>(b.data_ptr()), static_cast<uint16_t*>(b.data_ptr()) + n);
  });
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.1f * static_cast<float>(value(0, i) % 997) / 3.0f;
    float bacc = bf16_to_f32(f32_to_bf16(static_cast<float>(value(0, i) % 61) / 8.0f));
    for (int r = 1; r < P; ++r) {
      acc += 0.1f * static_cast<float>(value(r, i) % 997) / 3.0f;
      bacc += bf16_to_f32(f32_to_bf16(static_cast<float>(value(r, i) % 61) / 8.0f));
    }
    for (int r = 0; r < P; ++r) {
      ASSERT_EQ(results[static_cast<size_t>(r)][static_cast<size_t>(i)], acc) << "rank " << r << " i " << i;
      ASSERT_EQ(bf[static_cast<size_t>(r)][static_cast<size_t>(i)], f32_to_bf16(bacc));
    }
  }
}

TEST_P(CommunicatorRanks, ReduceScatterAllGatherBroadcast) {
  const int P = GetParam();
  const int64_t n = 37;
  run_ranks(P, [&](int rank, communicator& c) {
    tensor in = tensor::empty({P * n}, dtype::i32), out = tensor::empty({n}, dtype::i32);
    for (int64_t i = 0; i < P * n; ++i) in.data<int32_t>()[i] = static_cast<int32_t>(value(rank, i) % 100000);
    c.reduce_scatter(out, in, reduce_op::sum);
    for (int64_t i = 0; i < n; ++i) {
      int32_t want = 0;
      for (int r = 0; r < P; ++r) want += static_cast<int32_t>(value(r, rank * n + i) % 100000);
      ASSERT_EQ(out.data<int32_t>()[i], want);
    }
    tensor mine = tensor::full({n}, rank * 10 + 1, dtype::i64), all = tensor::empty({P * n}, dtype::i64);
    c.all_gather(all, mine);
    for (int r = 0; r < P; ++r)
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(all.data<int64_t>()[r * n + i], r * 10 + 1);
    const int root = P - 1;
    tensor b = tensor::full({n}, rank == root ? 42.5 : -1.0);
    c.broadcast(b, root);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(b.data<float>()[i], 42.5f);
    c.barrier();
  });
}

TEST_P(CommunicatorRanks, AllToAllVWithUnevenCountsAndSendRecv) {
  const int P = GetParam();
  // rank s sends (s + 2*d) % 5 elements to rank d, each = s*1000 + d*10 + k
  auto count = [](int s, int d) { return static_cast<int64_t>((s + 2 * d) % 5); };
  run_ranks(P, [&](int rank, communicator& c) {
    std::vector<int64_t> sc(static_cast<size_t>(P)), rc(static_cast<size_t>(P));
    std::vector<int64_t> send_vals, want;
    for (int d = 0; d < P; ++d) {
      sc[static_cast<size_t>(d)] = count(rank, d);
      for (int64_t k = 0; k < count(rank, d); ++k) send_vals.push_back(rank * 1000 + d * 10 + k);
    }
    for (int s = 0; s < P; ++s) {
      rc[static_cast<size_t>(s)] = count(s, rank);
      for (int64_t k = 0; k < count(s, rank); ++k) want.push_back(s * 1000 + rank * 10 + k);
    }
    tensor send = tensor::from_vector(send_vals.empty() ? std::vector<int64_t>{0} : send_vals,
                                      {static_cast<int64_t>(std::max<size_t>(send_vals.size(), 1))});
    tensor recv = tensor::zeros({static_cast<int64_t>(std::max<size_t>(want.size(), 1))}, dtype::i64);
    c.all_to_all_v(recv, rc, send, sc);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(recv.data<int64_t>()[i], want[i]) << "rank " << rank;
    if (P > 1) {  // a ring of send/recv with tags
      const int next = (rank + 1) % P, prev = (rank + P - 1) % P;
      tensor msg = tensor::full({3}, rank, dtype::i32), got = tensor::zeros({3}, dtype::i32);
      c.send(msg, next, 7);
      c.recv(got, prev, 7);
      for (int i = 0; i < 3; ++i) ASSERT_EQ(got.data<int32_t>()[i], prev);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommunicatorRanks, ::testing::Values(1, 2, 3, 4));

TEST(Communicator, AnAbsentRankIsNamedInsteadOfHanging) {
  auto group = make_inproc_group(3, 300);
  std::vector<std::string> errors(2);
  std::vector<std::thread> th;
  for (int r = 0; r < 2; ++r)  // rank 2 never calls the collective
    th.emplace_back([&, r] {
      tensor t = tensor::zeros({4});
      try {
        group[static_cast<size_t>(r)]->all_reduce(t, reduce_op::sum);
      } catch (const error& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : th) t.join();
  // The first waiter names both absent ranks, or just rank 2; both must mention rank 2.
  for (const auto& e : errors) EXPECT_NE(e.find("2 never arrived"), std::string::npos) << e;
}

TEST(Communicator, MismatchedCollectivesAndCountsAreRejected) {
  EXPECT_THROW(run_ranks(2,
                         [](int rank, communicator& c) {
                           tensor t = tensor::zeros({rank == 0 ? 4 : 5});
                           c.all_reduce(t, reduce_op::sum);
                         }),
               error);
  EXPECT_THROW(run_ranks(2,
                         [](int rank, communicator& c) {
                           tensor t = tensor::zeros({4});
                           if (rank == 0) c.all_reduce(t, reduce_op::sum);
                           else c.broadcast(t, 0);
                         }),
               error);
  auto g = make_inproc_group(2, 300);
  tensor t = tensor::zeros({2});
  EXPECT_THROW(g[0]->recv(t, 1, 0), error);  // nobody sent: times out with a message
}

// The shared conformance suite (runtime/communicator_check.h) on the in-process backend.
TEST_P(CommunicatorRanks, ConformanceSuitePasses) {
  const int P = GetParam();
  run_ranks(P, [&](int rank, communicator& c) {
    const auto results = check_communicator(c);
    ASSERT_GT(results.size(), 40u);
    for (const auto& r : results) EXPECT_TRUE(r.ok) << "rank " << rank << " " << r.name << ": " << r.detail;
  });
}

TEST(Communicator, AbortWakesEveryWaiterWithTheReason) {
  auto group = make_inproc_group(3, 20000);
  std::vector<std::string> errors(2);
  std::vector<std::thread> waiters;
  for (int r = 0; r < 2; ++r)
    waiters.emplace_back([&, r] {
      try {
        group[static_cast<size_t>(r)]->barrier();  // rank 2 never comes
      } catch (const error& e) {
        errors[static_cast<size_t>(r)] = std::string(errc_name(e.code())) + ": " + e.what();
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  group[2]->abort("rank 2 died (SIGKILL), reported by the supervisor");
  for (auto& t : waiters) t.join();
  for (const auto& e : errors) {
    EXPECT_NE(e.find("aborted"), std::string::npos) << e;
    EXPECT_NE(e.find("rank 2 died (SIGKILL)"), std::string::npos) << e;
  }
  tensor t = tensor::empty({4});
  try {
    group[0]->all_reduce(t, reduce_op::sum);
    FAIL() << "an aborted group must refuse later operations";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::aborted);
  }
}

TEST(Bootstrap, InprocAllGatherReturnsEveryBlobInRankOrder) {
  auto boots = make_inproc_bootstraps(4);
  std::vector<std::vector<std::string>> got(4);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      for (int round = 0; round < 3; ++round)
        got[static_cast<size_t>(r)] = boots[static_cast<size_t>(r)]->all_gather(std::string(static_cast<size_t>(r + round), 'a' + static_cast<char>(r)));
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 4; ++r)
    for (int s = 0; s < 4; ++s) EXPECT_EQ(got[static_cast<size_t>(r)][static_cast<size_t>(s)], std::string(static_cast<size_t>(s + 2), 'a' + static_cast<char>(s)));
}
