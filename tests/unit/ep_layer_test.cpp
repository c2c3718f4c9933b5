// The expert-parallel MoE layer (parallel/ep/ep_layer.h) on 2 and 4 in-process ranks against the
// single-rank MoE layer (parallel/model/moe_block.h) on the concatenated batch: standard EP, LLEP
// and EPLB, balanced and skewed routing, with and without a shared expert, with the weight
// transfers overlapped on a second communicator or not.
//   * LLEP and EPLB against standard EP: outputs, input gradients, router and shared-expert
//     gradients bitwise; expert weight gradients bitwise for experts computed on one rank, and
//     within 1e-6 (norm-wise relative) for an expert split over ranks (a sum of per-rank partials).
//   * standard EP against the single-rank layer on the concatenated batch: the same top-k experts
//     for every token; outputs and input gradients bitwise without a shared expert (the router is
//     batch invariant: moe_block.h invariant 3) and within 1e-6 norm-wise relative error with one
//     (the shared expert's dense MLP is not batch invariant: OpenBLAS picks kernels by shape);
//     expert weight gradients bitwise; the ranks' router gradients summed within 1e-6.
#include <gtest/gtest.h>

#include <thread>

#include "ep_test_util.h"
#include "parallel/ep/ep_runner.h"
#include "parallel/model/generate.h"
#include "runtime/error.h"

namespace {

using namespace ep_test;

std::vector<rank_result> run_ep(const problem& p, int P, const ep_options& opt, bool overlap, ep_placement placement) {
  auto tok = troupe::runtime::make_inproc_group(P, 20000);
  auto wts = troupe::runtime::make_inproc_group(P, 20000);
  std::vector<rank_result> res(static_cast<size_t>(P));
  std::vector<std::string> errors(static_cast<size_t>(P));
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      try {
        res[static_cast<size_t>(r)] = run_ep_rank(p, r, *tok[static_cast<size_t>(r)],
                                                  overlap ? wts[static_cast<size_t>(r)].get() : nullptr, opt, placement);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        tok[static_cast<size_t>(r)]->abort(e.what());
        wts[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : th) t.join();
  for (int r = 0; r < P; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  return res;
}

// Standard EP against the single-rank layer (see the top of the file).
void check_against_single_rank(const problem& p, const reference& ref, const std::vector<rank_result>& ep,
                               const ep_placement& placement) {
  const int P = static_cast<int>(ep.size());
  const int64_t C = p.cfg.hidden, K = p.cfg.top_k;
  int64_t tok = 0;
  for (int r = 0; r < P; ++r) {
    const int64_t n = p.tokens[static_cast<size_t>(r)];
    const auto& e = ep[static_cast<size_t>(r)];
    EXPECT_TRUE(std::equal(e.topk.begin(), e.topk.end(), ref.topk.begin() + tok * K)) << "top-k of rank " << r;
    if (p.cfg.shared_expert_intermediate > 0) {
      EXPECT_LE(rel_err(e.out.data(), ref.out.data() + tok * C, n * C), 1e-6) << "out rank " << r;
      EXPECT_LE(rel_err(e.dx.data(), ref.dx.data() + tok * C, n * C), 1e-6) << "dx rank " << r;
    } else {
      EXPECT_TRUE(same_bits(e.out.data(), ref.out.data() + tok * C, n * C)) << "out rank " << r;
      EXPECT_TRUE(same_bits(e.dx.data(), ref.dx.data() + tok * C, n * C)) << "dx rank " << r;
    }
    tok += n;
  }
  for (int64_t ex = 0; ex < p.cfg.n_experts; ++ex)
    for (int j = 0; j < 3; ++j) {
      const tensor& got = expert_tensor(ep[static_cast<size_t>(placement.native[static_cast<size_t>(ex)])].grads, j, ex);
      const tensor& want = expert_tensor(ref.grads, j, ex);
      EXPECT_TRUE(same_bits(got.data<float>(), want.data<float>(), want.numel())) << "expert " << ex << " grad " << j;
    }
  // The router's gradient: data parallel, so the ranks' sum (in rank order) is the whole batch's.
  std::vector<float> sum(static_cast<size_t>(ref.grads.router_w.numel()), 0.0f);
  for (const auto& e : ep)
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += e.grads.router_w.data<float>()[i];
  EXPECT_LE(rel_err(sum.data(), ref.grads.router_w.data<float>(), ref.grads.router_w.numel()), 1e-6);
}

// Another plan against standard EP's run: bitwise, except split experts' weight gradients.
int check_against_ep(const problem& p, const std::vector<rank_result>& ep, const std::vector<rank_result>& got,
                     const ep_placement& placement, const std::string& what) {
  const int P = static_cast<int>(ep.size());
  const int64_t C = p.cfg.hidden;
  for (int r = 0; r < P; ++r) {
    const int64_t n = p.tokens[static_cast<size_t>(r)] * C;
    const auto &a = got[static_cast<size_t>(r)], &b = ep[static_cast<size_t>(r)];
    EXPECT_TRUE(same_bits(a.out.data(), b.out.data(), n)) << what << " out rank " << r;
    EXPECT_TRUE(same_bits(a.dx.data(), b.dx.data(), n)) << what << " dx rank " << r;
    EXPECT_TRUE(same_bits(a.grads.router_w.data<float>(), b.grads.router_w.data<float>(), b.grads.router_w.numel()))
        << what << " router grad rank " << r;
    if (p.cfg.shared_expert_intermediate > 0) {
      EXPECT_TRUE(same_bits(a.grads.shared_down_w.data<float>(), b.grads.shared_down_w.data<float>(),
                            b.grads.shared_down_w.numel()))
          << what << " shared expert grad rank " << r;
      EXPECT_TRUE(same_bits(a.grads.shared_expert_gate.data<float>(), b.grads.shared_expert_gate.data<float>(),
                            b.grads.shared_expert_gate.numel()))
          << what << " shared gate grad rank " << r;
    }
  }
  const auto split = split_experts(got[0].stats.plan);
  int n_split = 0;
  for (int64_t e = 0; e < p.cfg.n_experts; ++e) {
    const int owner = placement.native[static_cast<size_t>(e)];
    for (int j = 0; j < 3; ++j) {
      const tensor& g = expert_tensor(got[static_cast<size_t>(owner)].grads, j, e);
      const tensor& w = expert_tensor(ep[static_cast<size_t>(owner)].grads, j, e);
      if (split[static_cast<size_t>(e)])
        EXPECT_LE(rel_err(g.data<float>(), w.data<float>(), w.numel()), 1e-6) << what << " split expert " << e;
      else
        EXPECT_TRUE(same_bits(g.data<float>(), w.data<float>(), w.numel())) << what << " expert " << e << " grad " << j;
    }
    n_split += split[static_cast<size_t>(e)] ? 1 : 0;
  }
  return n_split;
}

struct ep_case {
  int P;
  bool shared, skew, overlap;
};

class EpLayerExact : public ::testing::TestWithParam<ep_case> {};

TEST_P(EpLayerExact, EveryPlanEqualsStandardEpAndTheSingleRankLayer) {
  const auto c = GetParam();
  const problem p = make_problem(c.shared, c.skew, c.P, 7u + static_cast<uint32_t>(c.P));
  const ep_placement native = ep_placement::contiguous(p.cfg.n_experts, c.P);
  ep_options opt;
  opt.llep.min_chunk = 64;
  opt.mode = ep_mode::standard;
  const auto ep = run_ep(p, c.P, opt, c.overlap, native);
  ASSERT_EQ(ep.size(), static_cast<size_t>(c.P));
  check_against_single_rank(p, run_single(p), ep, native);
  for (const auto& r : ep) EXPECT_EQ(r.stats.weight_bytes_sent + r.stats.weight_bytes_received, 0u);
  const double ep_balance = ep[0].stats.plan.max_over_mean();

  for (ep_mode mode : {ep_mode::llep, ep_mode::eplb}) {
    opt.mode = mode;
    const auto res = run_ep(p, c.P, opt, c.overlap, native);
    const std::string what = std::string(ep_mode_name(mode)) + (c.skew ? " skewed" : " balanced");
    const int split = check_against_ep(p, ep, res, native, what);
    const ep_plan& plan = res[0].stats.plan;
    for (int r = 1; r < c.P; ++r)  // every rank planned the same
      EXPECT_EQ(res[static_cast<size_t>(r)].stats.plan.describe(), plan.describe()) << what;
    size_t sent = 0, received = 0;
    for (const auto& r : res) sent += r.stats.weight_bytes_sent, received += r.stats.weight_bytes_received;
    EXPECT_EQ(sent, received) << what;
    if (mode == ep_mode::llep && c.skew) {
      // Expert 0 takes most tokens: LLEP spills it, moves its weights and returns their gradients.
      EXPECT_FALSE(plan.gated) << plan.describe();
      EXPECT_GT(split, 0) << plan.describe();
      EXPECT_GT(sent, 0u);
      EXPECT_GT(ep_balance, 1.5);
      EXPECT_LT(plan.max_over_mean(), ep_balance) << plan.describe();
    }
    if (mode == ep_mode::llep && !c.skew) {
      EXPECT_TRUE(plan.gated) << plan.describe();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, EpLayerExact,
                         ::testing::Values(ep_case{2, false, true, true}, ep_case{2, true, true, false},
                                           ep_case{2, false, false, true}, ep_case{4, false, true, true},
                                           ep_case{4, true, true, true}, ep_case{4, true, false, false}),
                         [](const auto& info) {
                           const auto& c = info.param;
                           return "P" + std::to_string(c.P) + (c.shared ? "_shared" : "_mixtral") +
                                  (c.skew ? "_skewed" : "_balanced") + (c.overlap ? "_overlap" : "_serial");
                         });

TEST(EpLayer, MigratedPlacementGivesTheSameOutputs) {
  const int P = 2;
  const problem p = make_problem(false, true, P, 21);
  // Experts 0..3 native on rank 0 at first; then 0, 2, 4, 6 on rank 0 (a rebalanced placement).
  const ep_placement from = ep_placement::contiguous(p.cfg.n_experts, P);
  ep_placement to = from;
  for (int e = 0; e < 8; ++e) to.native[static_cast<size_t>(e)] = e % 2;
  auto tok = troupe::runtime::make_inproc_group(P, 20000);
  std::vector<std::vector<tensor>> gate(P), up(P), down(P);
  std::vector<size_t> sent(P);
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      layer_params L = p.w.layers[0];
      for (auto* v : {&L.expert_gate, &L.expert_up, &L.expert_down})
        for (auto& t : *v) t = t.clone();
      ep_shard_layer(L, from, r);
      sent[static_cast<size_t>(r)] = ep_migrate(ep_expert_sets(L, p.cfg), from, to, *tok[static_cast<size_t>(r)]);
      gate[static_cast<size_t>(r)] = L.expert_gate;
      up[static_cast<size_t>(r)] = L.expert_up;
      down[static_cast<size_t>(r)] = L.expert_down;
    });
  for (auto& t : th) t.join();
  const size_t expert_bytes = 3 * static_cast<size_t>(p.cfg.hidden * p.cfg.moe_intermediate) * sizeof(float);
  EXPECT_EQ(sent[0], 2 * expert_bytes);  // experts 1 and 3 leave rank 0
  EXPECT_EQ(sent[1], 2 * expert_bytes);  // experts 4 and 6 leave rank 1
  for (int e = 0; e < 8; ++e) {
    const int owner = to.native[static_cast<size_t>(e)];
    EXPECT_FALSE(gate[static_cast<size_t>(1 - owner)][static_cast<size_t>(e)].defined()) << e;
    const tensor& want = p.w.layers[0].expert_down[static_cast<size_t>(e)];
    ASSERT_TRUE(down[static_cast<size_t>(owner)][static_cast<size_t>(e)].defined()) << e;
    EXPECT_TRUE(same_bits(down[static_cast<size_t>(owner)][static_cast<size_t>(e)].data<float>(), want.data<float>(),
                          want.numel()));
  }
  // And the layer under the new placement is still the single-rank layer, with a better balance.
  ep_options opt;
  opt.mode = ep_mode::standard;
  const auto before = run_ep(p, P, opt, false, from);
  const auto after = run_ep(p, P, opt, false, to);
  for (int r = 0; r < P; ++r) {  // the same computation, other owners: bitwise
    EXPECT_TRUE(same_bits(after[static_cast<size_t>(r)].out.data(), before[static_cast<size_t>(r)].out.data(),
                          static_cast<int64_t>(before[static_cast<size_t>(r)].out.size())));
    EXPECT_TRUE(same_bits(after[static_cast<size_t>(r)].dx.data(), before[static_cast<size_t>(r)].dx.data(),
                          static_cast<int64_t>(before[static_cast<size_t>(r)].dx.size())));
  }
  for (int64_t e = 0; e < 8; ++e)
    EXPECT_TRUE(same_bits(expert_tensor(after[static_cast<size_t>(to.native[static_cast<size_t>(e)])].grads, 2, e).data<float>(),
                          expert_tensor(before[static_cast<size_t>(from.native[static_cast<size_t>(e)])].grads, 2, e).data<float>(),
                          p.cfg.hidden * p.cfg.moe_intermediate)) << e;
  EXPECT_LT(after[0].stats.plan.max_over_mean(), before[0].stats.plan.max_over_mean());
}

// EPLB keeps its replicas: the second step with the same routing fetches no weights and computes
// the same outputs; after drop_replicas() (an optimizer step) they are fetched again.
TEST(EpLayer, EplbReplicasStayResidentUntilTheWeightsChange) {
  const int P = 2;
  const problem p = make_problem(false, true, P, 33);
  const ep_placement native = ep_placement::contiguous(p.cfg.n_experts, P);
  auto tok = troupe::runtime::make_inproc_group(P, 20000);
  std::vector<std::vector<size_t>> fetched(P);
  std::vector<std::vector<std::vector<float>>> outs(P);
  std::vector<std::string> errors(P);
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      try {
        layer_params L = p.w.layers[0];
        ep_shard_layer(L, native, r);
        model_weights g = model_weights::zeros_like(p.w);
        ep_context ctx;
        ctx.tokens = tok[static_cast<size_t>(r)].get();
        ctx.placement = native;
        ctx.options.mode = ep_mode::eplb;
        ctx.options.eplb_redundant_per_rank = 1;
        const int64_t N = p.tokens[static_cast<size_t>(r)];
        for (int step = 0; step < 3; ++step) {
          if (step == 2) ctx.drop_replicas();
          std::vector<float> out(static_cast<size_t>(N * p.cfg.hidden)), dx(out.size());
          ep_activations a;
          ep_moe_forward(out.data(), a, p.x[static_cast<size_t>(r)].data(), L, p.cfg, N, ctx);
          ep_moe_backward(dx.data(), g.layers[0], p.dout[static_cast<size_t>(r)].data(), a,
                          p.x[static_cast<size_t>(r)].data(), L, p.cfg, N, ctx);
          fetched[static_cast<size_t>(r)].push_back(ctx.last.weights_fetched);
          outs[static_cast<size_t>(r)].push_back(out);
        }
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        tok[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : th) t.join();
  size_t first = 0, second = 0, third = 0;
  for (int r = 0; r < P; ++r) {
    ASSERT_EQ(errors[static_cast<size_t>(r)], "");
    first += fetched[static_cast<size_t>(r)][0];
    second += fetched[static_cast<size_t>(r)][1];
    third += fetched[static_cast<size_t>(r)][2];
    for (int s = 1; s < 3; ++s) EXPECT_EQ(outs[static_cast<size_t>(r)][static_cast<size_t>(s)], outs[static_cast<size_t>(r)][0]);
  }
  const size_t expert_bytes = 3 * static_cast<size_t>(p.cfg.hidden * p.cfg.moe_intermediate) * sizeof(float);
  // One extra slot per rank: expert 0 (native on rank 0) gets a replica on rank 1; the next heaviest
  // is also native on rank 0 and rank 1's only extra slot is taken, so it keeps one replica.
  EXPECT_EQ(first, expert_bytes);
  EXPECT_EQ(second, 0u);
  EXPECT_EQ(third, first);
}

TEST(EpLayer, MismatchedPlacementIsRefused) {
  const problem p = make_problem(false, false, 2, 3);
  auto tok = troupe::runtime::make_inproc_group(1, 2000);
  ep_context ctx;
  ctx.tokens = tok[0].get();
  ctx.placement = ep_placement::contiguous(p.cfg.n_experts, 2);  // 2 ranks, group of 1
  ep_activations a;
  std::vector<float> out(p.x[0].size());
  try {
    ep_moe_forward(out.data(), a, p.x[0].data(), p.w.layers[0], p.cfg, p.tokens[0], ctx);
    FAIL() << "expected an error";
  } catch (const troupe::runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("placement is for 8 experts on 2 ranks"), std::string::npos) << e.what();
  }
}

}  // namespace

// The serving path: greedy decoding with a KV cache through a decoder whose MoE layers run across
// 2 ranks (decoder::set_expert_parallel, as the serving engine uses it) produces the same tokens
// as one rank decoding the same prompts, and logits within 1e-5 (an expert's rows from both ranks
// are computed in one set of row tiles on its owner instead of one per rank).
TEST(EpLayer, GreedyDecodingThroughTheExpertParallelLayerMatchesOneRank) {
  const model_weights w = model_weights::load(std::string(TROUPE_FIXTURES_DIR) + "/mixtral_moe");
  const int P = 2;
  const int64_t B = 2, T0 = 6;
  const std::vector<std::vector<int32_t>> prompts = {{3, 17, 99, 4, 4, 60, 1, 2, 3, 4, 5, 6},
                                                     {120, 7, 7, 33, 80, 11, 9, 9, 10, 64, 2, 1}};
  auto tok = troupe::runtime::make_inproc_group(P, 20000);
  std::vector<generate_result> got(P), want(P);
  std::vector<double> logit_err(P, 0);
  std::vector<int64_t> last_rows(P, 0);
  std::vector<std::string> errors(P);
  std::vector<std::thread> th;
  for (int r = 0; r < P; ++r)
    th.emplace_back([&, r] {
      try {
        generate_options o;
        o.max_new_tokens = 8;
        decoder single(w);
        want[static_cast<size_t>(r)] = generate_greedy(single, prompts[static_cast<size_t>(r)], B, T0, o);
        const tensor ref = single.forward_logits(prompts[static_cast<size_t>(r)].data(), B, T0);
        ep_context ctx;
        ctx.tokens = tok[static_cast<size_t>(r)].get();
        ctx.placement = ep_placement::contiguous(w.config().n_experts, P);
        ctx.options.mode = ep_mode::llep;
        ctx.options.llep.lambda = 1.0;
        ep_moe_runner runner(ctx);
        decoder dec(w);
        dec.set_expert_parallel(&runner);
        const tensor lg = dec.forward_logits(prompts[static_cast<size_t>(r)].data(), B, T0);
        logit_err[static_cast<size_t>(r)] = rel_err(lg.data<float>(), ref.data<float>(), ref.numel());
        got[static_cast<size_t>(r)] = generate_greedy(dec, prompts[static_cast<size_t>(r)], B, T0, o);
        // The last decode step went through the layer: B tokens x top-k rows per rank, per MoE layer.
        const auto loads = runner.step_loads();
        int64_t rows = 0;
        for (int64_t l : loads) rows += l;
        last_rows[static_cast<size_t>(r)] = rows;
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        tok[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : th) t.join();
  for (int r = 0; r < P; ++r) {
    ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
    EXPECT_LE(logit_err[static_cast<size_t>(r)], 1e-5) << "rank " << r;
    EXPECT_EQ(got[static_cast<size_t>(r)].ids, want[static_cast<size_t>(r)].ids) << "rank " << r;
    EXPECT_EQ(got[static_cast<size_t>(r)].new_tokens, 8);
    EXPECT_EQ(last_rows[static_cast<size_t>(r)], B * P * w.config().top_k * w.config().n_layers);
  }
}
