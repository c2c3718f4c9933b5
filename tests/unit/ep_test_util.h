// tests/unit/ep_test_util.h — the MoE layer problems and references of the expert-parallel tests
// (ep_layer_test: in-process ranks; ep_layer_mpi_test: mpirun ranks).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "parallel/ep/ep_layer.h"
#include "parallel/model/model_weights.h"
#include "runtime/io/hf_config.h"

namespace ep_test {

using namespace troupe::parallel;
using namespace troupe::parallel::ep;
using troupe::runtime::tensor;

inline model_config moe_config(bool shared) {
  const std::string j =
      shared ? R"({"model_type":"qwen2_moe","vocab_size":17,"hidden_size":32,"intermediate_size":40,
                  "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"num_experts":8,
                  "num_experts_per_tok":2,"moe_intermediate_size":24,"shared_expert_intermediate_size":20,
                  "norm_topk_prob":false,"max_position_embeddings":16})"
             : R"({"model_type":"mixtral","vocab_size":17,"hidden_size":32,"intermediate_size":24,
                  "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"num_local_experts":8,
                  "num_experts_per_tok":2,"max_position_embeddings":16})";
  return troupe::runtime::parse_hf_config(j, shared ? "test:qwen2_moe" : "test:mixtral");
}

inline std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// A layer whose router sends most tokens to expert 0 (all native on rank 0) when `skew`: the router
// row of expert 0 is a large multiple of a direction u that every input shares.
struct problem {
  model_config cfg;
  model_weights w;
  std::vector<int64_t> tokens;          // per rank
  std::vector<std::vector<float>> x, dout;
  std::vector<float> u;
};

inline problem make_problem(bool shared, bool skew, int P, uint32_t seed) {
  problem p{moe_config(shared), {}, {}, {}, {}, {}};
  p.w = model_weights::random_init(p.cfg, seed, 0.3f);
  const int64_t C = p.cfg.hidden;
  p.u = randn(static_cast<size_t>(C), seed + 1);
  if (skew) {
    float* r0 = p.w.layers[0].router_w.data<float>();  // (E, C), row 0
    for (int64_t i = 0; i < C; ++i) r0[i] = 1.5f * p.u[static_cast<size_t>(i)];
  }
  for (int r = 0; r < P; ++r) {
    const int64_t N = 150 + 37 * r;  // ranks hold different token counts
    p.tokens.push_back(N);
    auto x = randn(static_cast<size_t>(N * C), seed + 10 + r);
    if (skew)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < C; ++i) x[static_cast<size_t>(n * C + i)] += p.u[static_cast<size_t>(i)];
    p.x.push_back(x);
    p.dout.push_back(randn(static_cast<size_t>(N * C), seed + 100 + r));
  }
  return p;
}

inline std::vector<float> concat(const std::vector<std::vector<float>>& v) {
  std::vector<float> out;
  for (const auto& a : v) out.insert(out.end(), a.begin(), a.end());
  return out;
}

inline bool same_bits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

struct rank_result {
  std::vector<float> out, dx;
  std::vector<int32_t> topk;
  layer_params grads;
  ep_step_stats stats;
};

// One rank's forward + backward of the expert-parallel layer on its tokens of `p` (its shard of the
// layer: native experts only).
inline rank_result run_ep_rank(const problem& p, int r, troupe::runtime::communicator& tokens,
                               troupe::runtime::communicator* weights, const ep_options& opt,
                               const ep_placement& placement) {
  const int64_t C = p.cfg.hidden;
  layer_params L = p.w.layers[0];
  ep_shard_layer(L, placement, r);
  model_weights g = model_weights::zeros_like(p.w);
  layer_params G = g.layers[0];
  ep_shard_layer(G, placement, r);
  ep_context ctx;
  ctx.tokens = &tokens;
  ctx.weights = weights;
  ctx.placement = placement;
  ctx.options = opt;
  const int64_t N = p.tokens[static_cast<size_t>(r)];
  rank_result out;
  out.out.assign(static_cast<size_t>(N * C), 0.0f);
  out.dx.assign(static_cast<size_t>(N * C), 0.0f);
  ep_activations a;
  ep_moe_forward(out.out.data(), a, p.x[static_cast<size_t>(r)].data(), L, p.cfg, N, ctx);
  ep_moe_backward(out.dx.data(), G, p.dout[static_cast<size_t>(r)].data(), a, p.x[static_cast<size_t>(r)].data(), L,
                  p.cfg, N, ctx);
  out.grads = G;
  out.stats = ctx.last;
  out.topk.assign(a.local.topk_idx.data<int32_t>(), a.local.topk_idx.data<int32_t>() + a.local.topk_idx.numel());
  return out;
}

struct reference {
  std::vector<float> out, dx;
  std::vector<int32_t> topk;
  layer_params grads;  // whole batch
};

inline reference run_single(const problem& p) {
  const int64_t C = p.cfg.hidden;
  reference ref;
  const auto x = concat(p.x), dout = concat(p.dout);
  const int64_t N = static_cast<int64_t>(x.size()) / C;
  ref.out.assign(x.size(), 0.0f);
  ref.dx.assign(x.size(), 0.0f);
  model_weights g = model_weights::zeros_like(p.w);
  moe_activations a;
  moe_forward(ref.out.data(), a, x.data(), p.w.layers[0], p.cfg, N);
  moe_backward(ref.dx.data(), g.layers[0], dout.data(), a, x.data(), p.w.layers[0], p.cfg, N);
  ref.grads = g.layers[0];
  ref.topk.assign(a.topk_idx.data<int32_t>(), a.topk_idx.data<int32_t>() + a.topk_idx.numel());
  return ref;
}

inline double rel_err(const float* got, const float* want, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

inline const tensor& expert_tensor(const layer_params& L, int j, int64_t e) {
  return (j == 0 ? L.expert_gate : j == 1 ? L.expert_up : L.expert_down)[static_cast<size_t>(e)];
}

// Experts whose rows the plan splits over ranks or computes away from their native rank.
inline std::vector<bool> split_experts(const ep_plan& plan) {
  std::vector<bool> split(plan.placement.native.size(), false);
  for (const auto& c : plan.chunks)
    if (c.rank != plan.placement.native[static_cast<size_t>(c.expert)] || c.begin > 0) split[static_cast<size_t>(c.expert)] = true;
  return split;
}

}  // namespace ep_test
