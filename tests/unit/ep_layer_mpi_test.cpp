// The expert-parallel MoE layer over MPI: `mpirun -np P` (ctest runs P = 2 and 4; started alone it
// is one rank and skips). Every rank builds the same problem, runs its share through the layer on
// MPI communicators (the borrowed weights on a second one, on their own thread), computes the
// single-rank layer on the whole batch itself, and checks its own rows and its native experts:
//   standard EP = the single-rank layer, bitwise (no shared expert: the router is batch invariant);
//   LLEP and EPLB = standard EP, bitwise, except a split expert's weight gradient (<= 1e-6).
#include <gtest/gtest.h>

#include "ep_test_util.h"
#include "runtime/communicator_mpi.h"

using namespace ep_test;

#ifdef TROUPE_HAVE_MPI

namespace {

class mpi_environment : public ::testing::Environment {
 public:
  void SetUp() override { session = std::make_unique<troupe::runtime::mpi_session>(); }
  void TearDown() override { session.reset(); }
  static inline std::unique_ptr<troupe::runtime::mpi_session> session;
};
[[maybe_unused]] ::testing::Environment* const mpi_env = ::testing::AddGlobalTestEnvironment(new mpi_environment);

std::unique_ptr<troupe::runtime::communicator> make_comm() {
  troupe::runtime::communicator_options o;
  o.timeout_ms = 30000;
  return troupe::runtime::make_mpi_communicator(o);
}

TEST(EpLayerMpi, EveryPlanEqualsStandardEpAndTheSingleRankLayer) {
  const int P = mpi_environment::session->size(), me = mpi_environment::session->rank();
  if (P < 2) GTEST_SKIP() << "one rank: run under mpirun -np 2 or 4";
  auto tokens = make_comm();
  auto weights = make_comm();
  const problem p = make_problem(/*shared=*/false, /*skew=*/true, P, 40u + static_cast<uint32_t>(P));
  const ep_placement native = ep_placement::contiguous(p.cfg.n_experts, P);
  const reference ref = run_single(p);
  const int64_t C = p.cfg.hidden, K = p.cfg.top_k;
  int64_t tok0 = 0;
  for (int r = 0; r < me; ++r) tok0 += p.tokens[static_cast<size_t>(r)];
  const int64_t n = p.tokens[static_cast<size_t>(me)];

  ep_options opt;
  opt.llep.min_chunk = 64;
  opt.mode = ep_mode::standard;
  const rank_result ep = run_ep_rank(p, me, *tokens, weights.get(), opt, native);
  EXPECT_TRUE(std::equal(ep.topk.begin(), ep.topk.end(), ref.topk.begin() + tok0 * K));
  EXPECT_TRUE(same_bits(ep.out.data(), ref.out.data() + tok0 * C, n * C)) << "rank " << me;
  EXPECT_TRUE(same_bits(ep.dx.data(), ref.dx.data() + tok0 * C, n * C)) << "rank " << me;
  for (int e : native.experts_of(me))
    for (int j = 0; j < 3; ++j)
      EXPECT_TRUE(same_bits(expert_tensor(ep.grads, j, e).data<float>(), expert_tensor(ref.grads, j, e).data<float>(),
                            expert_tensor(ref.grads, j, e).numel()))
          << "rank " << me << " expert " << e;

  for (ep_mode mode : {ep_mode::llep, ep_mode::eplb}) {
    opt.mode = mode;
    const rank_result got = run_ep_rank(p, me, *tokens, weights.get(), opt, native);
    EXPECT_TRUE(same_bits(got.out.data(), ep.out.data(), n * C)) << ep_mode_name(mode) << " rank " << me;
    EXPECT_TRUE(same_bits(got.dx.data(), ep.dx.data(), n * C)) << ep_mode_name(mode) << " rank " << me;
    const auto split = split_experts(got.stats.plan);
    for (int e : native.experts_of(me))
      for (int j = 0; j < 3; ++j) {
        const tensor &g = expert_tensor(got.grads, j, e), &w = expert_tensor(ep.grads, j, e);
        if (split[static_cast<size_t>(e)])
          EXPECT_LE(rel_err(g.data<float>(), w.data<float>(), w.numel()), 1e-6) << "split expert " << e;
        else
          EXPECT_TRUE(same_bits(g.data<float>(), w.data<float>(), w.numel())) << "expert " << e;
      }
    if (mode == ep_mode::llep) {
      // Expert 0 (on rank 0) takes most tokens: LLEP lends it, so some rank moved weights.
      troupe::runtime::tensor moved = troupe::runtime::tensor::zeros({1}, troupe::runtime::dtype::i64);
      moved.data<int64_t>()[0] = static_cast<int64_t>(got.stats.weight_bytes_sent);
      tokens->all_reduce(moved, troupe::runtime::reduce_op::sum);
      EXPECT_GT(moved.data<int64_t>()[0], 0) << got.stats.plan.describe();
      EXPECT_LT(got.stats.plan.max_over_mean(), ep.stats.plan.max_over_mean());
    }
  }
}

}  // namespace

#else

TEST(EpLayerMpi, BuiltWithoutMpi) { GTEST_SKIP() << "built without MPI"; }

#endif
