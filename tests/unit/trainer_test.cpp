// The trainer against references: the optimizer pieces against their formulas, the first
// steps against a transformers run (tests/fixtures/llama_train), data parallel against one
// rank, context parallel against one rank, and resume against the uninterrupted run.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "parallel/cxl/tiered_state.h"
#include "parallel/train/checkpoint.h"
#include "parallel/train/optimizer.h"
#include "parallel/train/trainer.h"
#include "runtime/communicator.h"
#include "runtime/io/safetensors.h"
#include "runtime/job_spec.h"
#include "runtime/tier_alloc.h"
#include "runtime/tier_registry.h"
#include "tests/unit/tmp_dir.h"

namespace {

using namespace troupe;
using parallel::model_weights;
using runtime::tensor;
namespace fs = std::filesystem;

std::string fixture(const std::string& name) {
  const char* env = std::getenv("TROUPE_FIXTURES_DIR");
  return std::string(env && *env ? env : TROUPE_FIXTURES_DIR) + "/" + name;
}

std::string shakespeare() { return std::string(TROUPE_FIXTURES_DIR) + "/../../examples/data/tinyshakespeare.txt"; }

// A tiny text job; `extra` lines are appended (later keys override nothing: give each once).
job::JobSpec text_job(const std::string& run_dir, const std::string& batch, const std::string& parallel,
                      int64_t steps = 3, int64_t eval_batches = 2) {
  const std::string yaml = fmt::format(R"(
model:
  create: {{preset: tiny, hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64, max_position: 64}}
data: {{train: "{}", format: text, val_fraction: 0.05, seed: 7}}
batch: {}
optimizer: {{lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 1, grad_clip: 1.0, weight_decay: 0.1}}
train: {{max_steps: {}, eval_every_steps: 0, eval_batches: {}}}
parallel: {}
checkpoint: {{every_steps: 0, keep: 0}}
seed: 11
run_dir: "{}"
)",
                                       shakespeare(), batch, steps, eval_batches, parallel, run_dir);
  return runtime::parse_job_spec(yaml, "trainer_test.yaml");
}

double max_abs_diff(const model_weights& a, const model_weights& b) {
  const auto pa = a.parameters();
  const auto pb = b.parameters();
  double m = 0;
  for (size_t i = 0; i < pa.size(); ++i)
    for (int64_t j = 0; j < pa[i].second.numel(); ++j)
      m = std::max(m, std::fabs(static_cast<double>(pa[i].second.data<float>()[j]) - pb[i].second.data<float>()[j]));
  return m;
}

bool bitwise_equal(const model_weights& a, const model_weights& b) {
  const auto pa = a.parameters();
  const auto pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (size_t i = 0; i < pa.size(); ++i)
    if (pa[i].second.numel() != pb[i].second.numel() ||
        std::memcmp(pa[i].second.data<float>(), pb[i].second.data<float>(),
                    static_cast<size_t>(pa[i].second.numel()) * sizeof(float)) != 0)
      return false;
  return true;
}

struct run_result {
  std::vector<double> losses, norms;
  double val = 0;
  size_t activation_bytes = 0;  // kept by the last training forward for backward
  model_weights weights;
  int64_t arena_fallbacks = -1;  // -1: no step arena
  int64_t arena_bytes = 0;
  double ep_max_over_mean = 0;   // parallel.ep > 1: the last step's per-rank rows max/mean
  size_t ep_weight_bytes = 0;    // and the expert weight bytes it moved on this rank
  int64_t held_experts = 0;      // expert tensors this rank holds (weights; a shard under parallel.ep)
  int64_t held_moments = 0;      // and AdamW exp_avg tensors of experts
  std::string checkpoint;        // rank 0: the checkpoint written after step `ckpt_after`
  int64_t resumed_at = -1;
};

// Weights after Adam steps are compared to 1e-5 (lr 3e-3): Adam divides by sqrt(v), so fp32
// summation-order differences in tiny gradients become differences of a fraction of a step.

// Runs `ranks` trainers of one job on threads over in-process communicators.
std::vector<run_result> run_ranks(const job::JobSpec& spec, int steps, bool eval, int ckpt_after = -1,
                                  const std::string& resume = "",
                                  const std::function<void(parallel::trainer&, int)>& after_step = nullptr) {
  const int dp = static_cast<int>(spec.parallel().dp()), cp = static_cast<int>(spec.parallel().cp());
  const int P = dp * cp;
  auto world = runtime::make_inproc_group(P);
  std::vector<std::vector<std::unique_ptr<runtime::communicator>>> cp_groups;
  for (int d = 0; d < dp; ++d) cp_groups.push_back(runtime::make_inproc_group(cp));
  const bool ep = spec.parallel().ep() > 1;
  auto ep_group = runtime::make_inproc_group(P), ep_weights = runtime::make_inproc_group(P);
  std::vector<run_result> out(static_cast<size_t>(P));
  std::vector<std::string> errors(static_cast<size_t>(P));
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      try {
        parallel::train_comms c;
        c.rank = r;
        c.world_size = P;
        c.grads = P > 1 ? world[static_cast<size_t>(r)].get() : nullptr;
        c.cp = cp > 1 ? cp_groups[static_cast<size_t>(r / cp)][static_cast<size_t>(r % cp)].get() : nullptr;
        c.ep = ep ? ep_group[static_cast<size_t>(r)].get() : nullptr;
        c.ep_weights = ep ? ep_weights[static_cast<size_t>(r)].get() : nullptr;
        auto t = parallel::make_trainer(spec, c, resume);
        out[static_cast<size_t>(r)].resumed_at = t->steps_done();
        for (int s = 0; s < steps; ++s) {
          const auto st = t->step();
          out[static_cast<size_t>(r)].losses.push_back(st.loss);
          out[static_cast<size_t>(r)].norms.push_back(st.grad_norm);
          if (s + 1 == ckpt_after) out[static_cast<size_t>(r)].checkpoint = t->save_checkpoint();  // every rank calls
          if (after_step) after_step(*t, s + 1);
        }
        for (const auto& [name, tt] : static_cast<const model_weights&>(t->weights()).parameters())
          out[static_cast<size_t>(r)].held_experts += name.find(".experts.") != std::string::npos ? 1 : 0;
        for (const auto& [name, tt] : static_cast<const model_weights&>(t->optimizer().exp_avg()).parameters())
          out[static_cast<size_t>(r)].held_moments += name.find(".experts.") != std::string::npos ? 1 : 0;
        out[static_cast<size_t>(r)].activation_bytes = t->activation_bytes();
        if (auto* e = t->expert_parallel()) {
          out[static_cast<size_t>(r)].ep_max_over_mean = e->step_max_over_mean();
          out[static_cast<size_t>(r)].ep_weight_bytes = e->step_weight_bytes();
        }
        if (t->arena()) {
          out[static_cast<size_t>(r)].arena_fallbacks = t->arena()->stats().fallbacks;
          out[static_cast<size_t>(r)].arena_bytes = t->memory_plan()->plan.arena_bytes;
        }
        if (eval) out[static_cast<size_t>(r)].val = t->evaluate();
        const model_weights full = t->gathered_weights();  // collective under parallel.ep
        out[static_cast<size_t>(r)].weights = model_weights::zeros_like(full);
        auto dst = out[static_cast<size_t>(r)].weights.parameters();
        const auto src = full.parameters();
        for (size_t i = 0; i < src.size(); ++i)
          std::memcpy(dst[i].value.data<float>(), src[i].second.data<float>(),
                      static_cast<size_t>(src[i].second.numel()) * sizeof(float));
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        world[static_cast<size_t>(r)]->abort(e.what());
        ep_group[static_cast<size_t>(r)]->abort(e.what());
        ep_weights[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < P; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  return out;
}

// ------------------------------------------------------------------ optimizer pieces

TEST(Optimizer, ScheduleWarmsUpLinearlyThenDecaysByCosineToMinLr) {
  parallel::lr_schedule s{1e-2, 1e-3, 2, 6};
  EXPECT_DOUBLE_EQ(s.at(0), 5e-3);
  EXPECT_DOUBLE_EQ(s.at(1), 1e-2);
  EXPECT_DOUBLE_EQ(s.at(2), 1e-2);                                      // p = 0
  EXPECT_NEAR(s.at(3), 1e-3 + 0.5 * 9e-3 * (1 + std::cos(M_PI * 0.25)), 1e-15);
  EXPECT_NEAR(s.at(4), 5.5e-3, 1e-15);                                  // p = 1/2
  EXPECT_DOUBLE_EQ(s.at(6), 1e-3);                                      // p = 1
  EXPECT_DOUBLE_EQ(s.at(100), 1e-3);                                    // clamped past the end
  parallel::lr_schedule flat{1e-3, 1e-3, 0, 10};
  EXPECT_DOUBLE_EQ(flat.at(0), 1e-3);
}

TEST(Optimizer, ClippingScalesByMaxNormOverNormAndReportsTheNormBefore) {
  runtime::model_config c;
  c.vocab_size = 8, c.hidden = 4, c.intermediate = 8, c.n_layers = 1, c.n_heads = 2, c.n_kv_heads = 1,
  c.head_dim = 2;
  model_weights g = model_weights::allocate(c);
  g.embed.data<float>()[0] = 3.0f;
  g.final_norm.data<float>()[1] = 4.0f;  // norm 5
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm(g, 10.0), 5.0);  // below: untouched
  EXPECT_EQ(g.embed.data<float>()[0], 3.0f);
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm(g, 1.0), 5.0);
  EXPECT_NEAR(g.embed.data<float>()[0], 3.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(g.final_norm.data<float>()[1], 4.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(parallel::grad_global_norm(g), 1.0, 1e-6);
}

TEST(Optimizer, AdamWDecaysMatricesButNotNormWeights) {
  runtime::model_config c;
  c.vocab_size = 8, c.hidden = 4, c.intermediate = 8, c.n_layers = 1, c.n_heads = 2, c.n_kv_heads = 1,
  c.head_dim = 2;
  model_weights w = model_weights::random_init(c, 3, 0.5f);
  const float e0 = w.embed.data<float>()[5], n0 = w.final_norm.data<float>()[2];
  model_weights g = model_weights::zeros_like(w);  // zero gradient: only the decay moves weights
  parallel::adamw opt(w, {0.9, 0.95, 1e-8, 0.1});
  opt.step(w, g, 0.5);
  EXPECT_EQ(opt.steps(), 1);
  EXPECT_FLOAT_EQ(w.embed.data<float>()[5], e0 * (1.0f - 0.5f * 0.1f));
  EXPECT_EQ(w.final_norm.data<float>()[2], n0);
}

// ------------------------------------------------------------------ against transformers

// Serves the fixture's recorded windows: batches[s, a] (B, T+1).
class fixture_source : public parallel::batch_source {
 public:
  explicit fixture_source(tensor batches) : b_(std::move(batches)) {}
  void next(int32_t* inputs, int32_t* targets) override {
    const int64_t A = b_.size(1), B = b_.size(2), T1 = b_.size(3);
    const int64_t* base = b_.data<int64_t>() + (pos_ / A * A + pos_ % A) * B * T1;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t + 1 < T1; ++t) {
        inputs[b * (T1 - 1) + t] = static_cast<int32_t>(base[b * T1 + t]);
        targets[b * (T1 - 1) + t] = static_cast<int32_t>(base[b * T1 + t + 1]);
      }
    ++pos_;
  }
  nlohmann::json position() const override { return {{"index", pos_}}; }
  void restore(const nlohmann::json& p) override { pos_ = p["index"].get<int64_t>(); }

 private:
  tensor b_;
  int64_t pos_ = 0;
};

TEST(Trainer, FirstStepsMatchATransformersRunOfTheSameCheckpointAndBatches) {
  const std::string dir = fixture("llama_train");
  auto ex = runtime::safetensors_file::open(dir + "/expected.safetensors");
  tensor batches = ex.get_as("batches", runtime::dtype::i64);
  const int64_t S = batches.size(0), A = batches.size(1), B = batches.size(2), T = batches.size(3) - 1;
  const std::string yaml = fmt::format(R"(
model: {{path: "{}"}}
data: {{train: unused.bin, format: tokens_u16, val_fraction: 0}}
batch: {{seq_len: {}, micro_batch: {}, grad_accum: {}}}
optimizer: {{lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1,
            grad_clip: 1.0}}
train: {{max_steps: {}}}
)",
                                       dir, T, B, A, S);
  const job::JobSpec spec = runtime::parse_job_spec(yaml, "fixture_job.yaml");
  parallel::trainer t(spec, {}, model_weights::load(dir), std::make_unique<fixture_source>(batches), nullptr);
  tensor loss = ex.get_as("loss", runtime::dtype::f32), norm = ex.get_as("grad_norm", runtime::dtype::f32),
         lr = ex.get_as("lr", runtime::dtype::f32);
  bool clipped = false, unclipped = false;
  for (int64_t s = 0; s < S; ++s) {
    const auto st = t.step();
    EXPECT_NEAR(st.loss, loss.data<float>()[s], 2e-5 * std::fabs(loss.data<float>()[s])) << "step " << s;
    EXPECT_NEAR(st.grad_norm, norm.data<float>()[s], 1e-4 * norm.data<float>()[s]) << "step " << s;
    EXPECT_NEAR(st.lr, lr.data<float>()[s], 1e-9) << "step " << s;
    (st.grad_norm > 1.0 ? clipped : unclipped) = true;
  }
  EXPECT_TRUE(clipped && unclipped) << "the fixture should exercise both sides of clipping";
  EXPECT_LT(loss.data<float>()[S - 1], loss.data<float>()[0] - 0.5) << "the fixture's loss should fall";
  // Adam divides by sqrt(v): where a gradient is nearly zero, fp32 rounding differences in it
  // become O(lr) differences in the update. So: all but a handful of elements agree to 2e-5,
  // and none is off by a tenth of one step (lr = 1e-2).
  double worst = 0;
  int64_t loose = 0, total = 0;
  for (const auto& [name, w] : static_cast<const model_weights&>(t.weights()).parameters()) {
    tensor ref = ex.get_as("final." + name, runtime::dtype::f32, w.shape());
    for (int64_t i = 0; i < w.numel(); ++i) {
      const double d = std::fabs(static_cast<double>(w.data<float>()[i]) - ref.data<float>()[i]);
      worst = std::max(worst, d);
      loose += d > 2e-5;
    }
    total += w.numel();
  }
  EXPECT_LE(loose, 10) << "of " << total << " weights after " << S << " steps differ from transformers + AdamW by > 2e-5";
  EXPECT_LT(worst, 1e-3);
}

// ------------------------------------------------------------------ parallel = one rank

TEST(Trainer, DataParallelTwoRanksEqualOneRankWithTheSameGlobalBatch) {
  tmp_dir d;
  // Validation reads eval_batches micro batches per dp rank: 4 on one rank = 2 on each of two.
  const auto one = run_ranks(text_job(d.file("run"), "{seq_len: 32, micro_batch: 2, global_batch: 8}", "{dp: 1}", 3, 4), 3, true);
  const auto two = run_ranks(text_job(d.file("run"), "{seq_len: 32, micro_batch: 2, global_batch: 8}", "{dp: 2}"), 3, true);
  ASSERT_EQ(two.size(), 2u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_NEAR(two[0].losses[s], one[0].losses[s], 1e-5 * one[0].losses[s]) << "step " << s;
    EXPECT_EQ(two[0].losses[s], two[1].losses[s]) << "ranks disagree on the loss";
    EXPECT_NEAR(two[0].norms[s], one[0].norms[s], 1e-4 * one[0].norms[s]);
  }
  EXPECT_LT(one[0].losses[2], one[0].losses[0]) << "the loss should fall";
  EXPECT_NEAR(two[0].val, one[0].val, 1e-5 * one[0].val);
  EXPECT_TRUE(bitwise_equal(two[0].weights, two[1].weights)) << "dp ranks must hold identical weights";
  EXPECT_LT(max_abs_diff(two[0].weights, one[0].weights), 1e-5);
}

// An MoE model (model.create.experts) trained with its experts spread over the ranks (parallel.ep):
// the same losses, gradient norms and weights as data parallelism alone, for standard EP and LLEP.
// Within 1e-5, not bitwise: an expert's rows from both ranks are computed in one set of row tiles
// on its owner instead of two (per rank), which groups the weight-gradient sums differently.
job::JobSpec moe_job(const std::string& run_dir, const std::string& parallel) {
  job::JobSpec s = text_job(run_dir, "{seq_len: 32, micro_batch: 4, global_batch: 8}", parallel, 3, 2);
  auto* c = s.mutable_model()->mutable_create();
  c->set_experts(8);
  c->set_experts_per_token(2);
  c->set_expert_intermediate(48);
  return s;
}

TEST(Trainer, ExpertParallelMoeEqualsDataParallelForStandardEpAndLlep) {
  tmp_dir d;
  const auto dp = run_ranks(moe_job(d.file("dp"), "{dp: 2}"), 3, true);
  const auto ep = run_ranks(moe_job(d.file("ep"), "{dp: 2, ep: 2, expert: {mode: ep}}"), 3, true);
  // LLEP with a gate of 1.0 and small chunks, so it plans (and moves weights) on this small model.
  const auto ll = run_ranks(moe_job(d.file("llep"), "{dp: 2, ep: 2, expert: {mode: llep, lambda: 1.0, min_chunk: 64}}"),
                            3, true);
  ASSERT_EQ(ep.size(), 2u);
  ASSERT_EQ(ll.size(), 2u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_NEAR(ep[0].losses[s], dp[0].losses[s], 1e-5 * dp[0].losses[s]) << "step " << s;
    EXPECT_NEAR(ll[0].losses[s], dp[0].losses[s], 1e-5 * dp[0].losses[s]) << "step " << s;
    EXPECT_NEAR(ep[0].norms[s], dp[0].norms[s], 1e-4 * dp[0].norms[s]) << "step " << s;
    EXPECT_EQ(ep[0].losses[s], ep[1].losses[s]);
  }
  // Standard EP and LLEP compute every row the same way (ep_layer.h invariant 2): the forward of
  // the first step is bitwise the same, so the first loss is too.
  EXPECT_EQ(ll[0].losses[0], ep[0].losses[0]);
  EXPECT_LT(dp[0].losses[2], dp[0].losses[0]) << "the loss should fall";
  EXPECT_NEAR(ep[0].val, dp[0].val, 1e-5 * dp[0].val);
  EXPECT_TRUE(bitwise_equal(ep[0].weights, ep[1].weights)) << "ep ranks must hold identical weights";
  EXPECT_TRUE(bitwise_equal(ll[0].weights, ll[1].weights)) << "ep ranks must hold identical weights";
  EXPECT_LT(max_abs_diff(ep[0].weights, dp[0].weights), 1e-5);
  EXPECT_LT(max_abs_diff(ll[0].weights, dp[0].weights), 1e-5);
  // Each rank holds its 4 of the 8 experts (x 3 matrices x 2 layers), in weights and moments.
  for (const auto* run : {&ep, &ll})
    for (const auto& r : *run) {
      EXPECT_EQ(r.held_experts, 4 * 3 * 2);
      EXPECT_EQ(r.held_moments, 4 * 3 * 2);
    }
  EXPECT_EQ(dp[0].held_experts, 8 * 3 * 2);
  EXPECT_EQ(ep[0].ep_weight_bytes, 0u);
  EXPECT_GT(ll[0].ep_weight_bytes + ll[1].ep_weight_bytes, 0u) << "LLEP should have lent an expert";
  EXPECT_GT(ep[0].ep_max_over_mean, 1.0);
  EXPECT_LE(ll[0].ep_max_over_mean, ep[0].ep_max_over_mean);
}

// A checkpoint of an expert-parallel run holds every expert (gathered from both ranks) and resumes
// (each rank taking its shard back) into the uninterrupted run, bitwise.
TEST(Trainer, ExpertParallelCheckpointHoldsEveryExpertAndResumesBitwise) {
  tmp_dir d;
  const job::JobSpec spec = moe_job(d.file("run"), "{dp: 2, ep: 2, expert: {mode: llep, lambda: 1.0, min_chunk: 64}}");
  const auto straight = run_ranks(spec, 4, false, /*ckpt_after=*/2);
  ASSERT_FALSE(straight[0].checkpoint.empty());
  EXPECT_EQ(straight[1].checkpoint, "");
  const model_weights saved = model_weights::load(straight[0].checkpoint);
  EXPECT_TRUE(saved.complete());
  EXPECT_EQ(saved.layers[1].expert_down.size(), 8u);
  const auto resumed = run_ranks(spec, 2, false, -1, straight[0].checkpoint);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(resumed[static_cast<size_t>(r)].resumed_at, 2);
    for (int s = 0; s < 2; ++s)
      EXPECT_EQ(resumed[static_cast<size_t>(r)].losses[static_cast<size_t>(s)],
                straight[static_cast<size_t>(r)].losses[static_cast<size_t>(s + 2)])
          << "rank " << r << " step " << s + 3;
  }
  EXPECT_TRUE(bitwise_equal(resumed[0].weights, straight[0].weights));
}

// A placement change between steps (what the supervisor's rebalancing does) moves each layer's
// experts with their gradients and AdamW moments; standard EP computes every expert the same way
// wherever it lives, so the run stays bitwise the run without the change.
TEST(Trainer, ExpertParallelPlacementChangeBetweenStepsKeepsTheRunBitwise) {
  tmp_dir d;
  const job::JobSpec spec = moe_job(d.file("run"), "{dp: 2, ep: 2, expert: {mode: ep}}");
  const auto plain = run_ranks(spec, 4, false);
  std::vector<size_t> sent(2, 0);
  const auto moved = run_ranks(spec, 4, false, -1, "", [&](parallel::trainer& t, int step) {
    if (step != 2) return;
    parallel::ep::ep_placement to = t.expert_parallel()->placement(0);
    for (size_t e = 0; e < to.native.size(); ++e) to.native[e] = static_cast<int>(e % 2);  // 0,2,4,6 | 1,3,5,7
    for (int64_t l = 0; l < 2; ++l) sent[static_cast<size_t>(t.comms().rank)] += t.migrate_experts(l, to);
  });
  for (int r = 0; r < 2; ++r)
    for (int s = 0; s < 4; ++s)
      EXPECT_EQ(moved[static_cast<size_t>(r)].losses[static_cast<size_t>(s)],
                plain[static_cast<size_t>(r)].losses[static_cast<size_t>(s)])
          << "rank " << r << " step " << s + 1;
  EXPECT_TRUE(bitwise_equal(moved[0].weights, plain[0].weights));
  // Experts 1, 3 leave rank 0 and 4, 6 leave rank 1, per layer: weights, grads, m, v (4 x 3 tensors).
  const size_t expert_bytes = 3 * 32 * 48 * sizeof(float);
  EXPECT_EQ(sent[0], 2 * 2 * 4 * expert_bytes);
  EXPECT_EQ(sent[1], 2 * 2 * 4 * expert_bytes);
  EXPECT_EQ(moved[0].held_experts, 4 * 3 * 2);
}

TEST(Trainer, ExpertParallelRefusesADenseModelAndAnEpThatIsNotEveryRank) {
  tmp_dir d;
  try {
    auto s = text_job(d.file("dense"), "{seq_len: 32, micro_batch: 2, global_batch: 4}", "{dp: 2, ep: 2}");
    auto world = runtime::make_inproc_group(2, 2000);  // rank 1 never comes: the check runs first
    parallel::train_comms c;
    c.rank = 0;
    c.world_size = 2;
    c.grads = world[0].get();
    c.ep = world[0].get();
    (void)parallel::make_trainer(s, c);
    FAIL() << "a dense model with parallel.ep = 2 should be refused";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.ep = 2: the model (llama) has no MoE layer"), std::string::npos)
        << e.what();
  }
  try {
    (void)text_job(d.file("ep3"), "{seq_len: 32, micro_batch: 2, global_batch: 8}", "{dp: 4, ep: 2}");
    FAIL() << "parallel.ep = 2 of 4 ranks should be refused";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("`parallel.ep`"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("must be 1 (off) or dp * cp = 4"), std::string::npos) << e.what();
  }
}

void expect_cp_equals_one_rank(const std::string& mode) {
  tmp_dir d;
  const std::string batch = "{seq_len: 64, micro_batch: 2, global_batch: 4}";
  const auto one = run_ranks(text_job(d.file("run"), batch, "{dp: 1, cp: 1}"), 2, true);
  const auto two = run_ranks(text_job(d.file("run"), batch, "{dp: 1, cp: 2, cp_mode: " + mode + "}"), 2, true);
  for (int s = 0; s < 2; ++s) {
    EXPECT_NEAR(two[0].losses[s], one[0].losses[s], 1e-5 * one[0].losses[s]) << mode << " step " << s;
    EXPECT_EQ(two[0].losses[s], two[1].losses[s]);
  }
  EXPECT_NEAR(two[0].val, one[0].val, 1e-5 * one[0].val) << mode;
  EXPECT_TRUE(bitwise_equal(two[0].weights, two[1].weights));
  EXPECT_LT(max_abs_diff(two[0].weights, one[0].weights), 1e-5) << mode;
  // The point of CP: each rank keeps only its half of the sequence's activations.
  EXPECT_LT(two[0].activation_bytes, one[0].activation_bytes * 55 / 100) << mode;
  EXPECT_GT(two[0].activation_bytes, one[0].activation_bytes * 45 / 100) << mode;
}

TEST(Trainer, ContextParallelUlyssesEqualsOneRankOnTheSameSequences) { expect_cp_equals_one_rank("ulysses"); }
TEST(Trainer, ContextParallelRingEqualsOneRankOnTheSameSequences) { expect_cp_equals_one_rank("ring"); }

TEST(Trainer, DataTimesContextParallelFourRanksEqualOneRank) {
  tmp_dir d;
  const std::string batch = "{seq_len: 32, micro_batch: 1, global_batch: 4}";
  const auto one = run_ranks(text_job(d.file("run"), batch, "{dp: 1, cp: 1}"), 2, false);
  const auto four = run_ranks(text_job(d.file("run"), batch, "{dp: 2, cp: 2, cp_mode: ulysses}"), 2, false);
  ASSERT_EQ(four.size(), 4u);
  for (int s = 0; s < 2; ++s) EXPECT_NEAR(four[3].losses[s], one[0].losses[s], 1e-5 * one[0].losses[s]);
  EXPECT_LT(max_abs_diff(four[3].weights, one[0].weights), 1e-5);
}

// ------------------------------------------------------------------ MEMO under a device budget

job::JobSpec memo_job(const std::string& run_dir, const std::string& parallel, const std::string& budget, bool memo) {
  job::JobSpec s = text_job(run_dir, "{seq_len: 64, micro_batch: 2, global_batch: 4}", parallel, 3);
  s.mutable_model()->mutable_create()->set_layers(4);
  s.mutable_memory()->set_device_budget(budget);
  s.mutable_memory()->mutable_memo()->set_enabled(memo);
  s.mutable_memory()->mutable_memo()->set_alpha("0.5");
  s.mutable_memory()->mutable_memo()->set_keep_last_layers(0);
  s.mutable_memory()->set_plan_cache(run_dir + "/plans");
  return s;
}

TEST(Trainer, MemoUnderABudgetThatNeedsItEqualsTheUnbudgetedRunBitwise) {
  tmp_dir d;
  const job::JobSpec plain = memo_job(d.file("plain"), "{dp: 1}", "", false);
  // The budget: exactly what MEMO's plan needs; the same job without offload needs more.
  const model_weights w = parallel::make_model(plain);
  parallel::memo::memory_settings ms = parallel::memo::memory_settings_of(memo_job(d.file("x"), "{dp: 1}", "1GiB", true));
  const auto with = parallel::memo::plan_memory(w, 2, 64, ms, false);
  ms.memo = false;
  const auto without = parallel::memo::plan_memory(w, 2, 64, ms, false);
  ASSERT_LT(with.device_bytes, without.device_bytes);
  const std::string budget = std::to_string(with.device_bytes);

  const auto ref = run_ranks(plain, 3, true);
  const auto got = run_ranks(memo_job(d.file("memo"), "{dp: 1}", budget, true), 3, true);
  ASSERT_EQ(got[0].losses.size(), 3u);
  for (int s = 0; s < 3; ++s) EXPECT_EQ(got[0].losses[s], ref[0].losses[s]) << "step " << s;
  EXPECT_EQ(got[0].val, ref[0].val);
  EXPECT_TRUE(bitwise_equal(got[0].weights, ref[0].weights));
  EXPECT_EQ(got[0].arena_fallbacks, 0) << "every allocation of every step came from the planned arena";
  EXPECT_EQ(got[0].arena_bytes, with.plan.arena_bytes);
  EXPECT_EQ(got[0].activation_bytes, 0u) << "no activation outlives an arena step";
  // Without MEMO the same budget is refused, and the error says what fits.
  try {
    parallel::make_trainer(memo_job(d.file("nomemo"), "{dp: 1}", budget, false), {});
    ADD_FAILURE() << "a budget below the no-offload plan must be refused";
  } catch (const runtime::error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("does not fit memory.device_budget"), std::string::npos) << m;
    EXPECT_NE(m.find("largest seq_len that fits"), std::string::npos) << m;
    EXPECT_NE(m.find("with MEMO on"), std::string::npos) << m;
  }
}

TEST(Trainer, ABudgetBelowTheWeightsIsRefusedNamingThem) {
  tmp_dir d;
  try {
    parallel::make_trainer(memo_job(d.file("run"), "{dp: 1}", "64KiB", true), {});
    ADD_FAILURE() << "64 KiB cannot hold the model";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("weights, gradients and AdamW moments alone exceed it"), std::string::npos)
        << e.what();
  }
}

TEST(Trainer, MemoWithRingContextParallelEqualsThePlainRingRunBitwise) {
  tmp_dir d;
  const auto ref = run_ranks(memo_job(d.file("plain"), "{dp: 1, cp: 2, cp_mode: ring}", "", false), 2, false);
  const auto got = run_ranks(memo_job(d.file("memo"), "{dp: 1, cp: 2, cp_mode: ring}", "1GiB", true), 2, false);
  for (int r = 0; r < 2; ++r) {
    for (int s = 0; s < 2; ++s) EXPECT_EQ(got[r].losses[s], ref[r].losses[s]) << "rank " << r << " step " << s;
    EXPECT_TRUE(bitwise_equal(got[r].weights, ref[r].weights)) << "rank " << r;
    EXPECT_EQ(got[r].arena_fallbacks, 0) << "rank " << r << ": the plan was recorded with the cp buffers";
  }
}

// ------------------------------------------------------------------ resume

TEST(Trainer, ResumeFromACheckpointReproducesTheUninterruptedRunBitwise) {
  tmp_dir d;
  const job::JobSpec spec = text_job(d.file("run"), "{seq_len: 32, micro_batch: 2, grad_accum: 2}", "{dp: 1}", 5);
  std::vector<double> straight;
  std::string ckpt;
  model_weights final_straight;
  {
    auto t = parallel::make_trainer(spec, {});
    for (int s = 0; s < 5; ++s) {
      straight.push_back(t->step().loss);
      if (s == 1) ckpt = t->save_checkpoint();  // after step 2
    }
    final_straight = model_weights::zeros_like(t->weights());
    auto dst = final_straight.parameters();
    const auto src = static_cast<const model_weights&>(t->weights()).parameters();
    for (size_t i = 0; i < src.size(); ++i)
      std::memcpy(dst[i].value.data<float>(), src[i].second.data<float>(), src[i].second.nbytes());
  }
  ASSERT_FALSE(ckpt.empty());
  EXPECT_EQ(parallel::latest_checkpoint(spec.checkpoint().dir()), ckpt);
  auto t = parallel::make_trainer(spec, {}, spec.checkpoint().dir());  // the root: follows `latest`
  EXPECT_EQ(t->steps_done(), 2);
  for (int s = 2; s < 5; ++s) EXPECT_EQ(t->step().loss, straight[static_cast<size_t>(s)]) << "step " << s + 1;
  EXPECT_TRUE(bitwise_equal(t->weights(), final_straight));
  EXPECT_EQ(t->state()["train_position"], nlohmann::json::parse(R"({"epoch":0,"index":20})"));
}

TEST(Trainer, ResumeRejectsACheckpointOfAnotherModel) {
  tmp_dir d;
  const job::JobSpec spec = text_job(d.file("run"), "{seq_len: 32, micro_batch: 2, grad_accum: 1}", "{dp: 1}", 1);
  auto t = parallel::make_trainer(spec, {});
  t->step();
  const std::string ckpt = t->save_checkpoint();
  job::JobSpec other = spec;
  other.mutable_model()->mutable_create()->set_hidden(64);
  try {
    parallel::make_trainer(other, {}, ckpt);
    FAIL() << "a checkpoint of another shape was accepted";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("does not match the job's model"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------ host placement on memory tiers

// The text job with a dram tier and an emulated CXL tier, both on node 0 (every machine has it).
job::JobSpec tiered_job(const std::string& run_dir, const std::string& policy, const std::string& budget,
                        bool memo) {
  job::JobSpec s = text_job(run_dir, "{seq_len: 32, micro_batch: 2, grad_accum: 2}", "{dp: 1}", 3);
  auto* m = s.mutable_memory();
  auto* dram = m->add_tiers();
  dram->set_name("dram");
  dram->add_numa_nodes(0);
  dram->set_capacity("1GiB");
  auto* cxl = m->add_tiers();
  cxl->set_name("cxl");
  cxl->set_kind(job::Tier::CXL);
  cxl->add_numa_nodes(0);
  cxl->set_capacity("1GiB");
  cxl->set_emulated_gbps(50);
  m->set_placement(policy);
  m->set_local_dram_budget(budget);
  if (memo) {
    m->mutable_memo()->set_enabled(true);
    m->mutable_memo()->set_alpha("0.5");
    m->mutable_memo()->set_keep_last_layers(0);
    m->set_plan_cache(run_dir + "/plans");
  }
  runtime::validate_job_spec(s);
  return s;
}

// Every parameter of w lies in the allocation a.
bool inside(const model_weights& w, const runtime::tier_allocation* a) {
  if (a == nullptr) return false;
  const auto* lo = static_cast<const std::byte*>(a->ptr);
  for (const auto& [name, t] : w.parameters()) {
    const auto* p = static_cast<const std::byte*>(t.data_ptr());
    if (p < lo || p + t.nbytes() > lo + a->bytes) return false;
  }
  return true;
}

TEST(Trainer, LatencyFirstPlacementOnEmulatedCxlKeepsTheRunBitwiseAndPutsEveryGroupWhereThePlanSays) {
  tmp_dir d;
  const job::JobSpec plain = text_job(d.file("plain"), "{seq_len: 32, micro_batch: 2, grad_accum: 2}", "{dp: 1}", 3);
  const auto ref = run_ranks(plain, 3, false);
  // Momentum, variance and master grads fit the budget; the master weights straddle it (half in DRAM).
  const int64_t S = parallel::cxl::tiered_bytes(parallel::make_model(plain));
  const int64_t budget = 3 * S + S / 2;
  auto t = parallel::make_trainer(tiered_job(d.file("tiered"), "", std::to_string(budget), true), {});

  // (b) the plan: latency-first with this job's sizes.
  const parallel::cxl::placement_plan* p = t->placement();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->policy, parallel::cxl::placement_policy::latency_first) << "the default with memory.tiers";
  EXPECT_EQ(p->local_dram_budget, budget);
  ASSERT_EQ(p->groups.size(), 7u);
  const std::vector<std::string> order{"momentum",        "variance",    "master_grads", "master_weights",
                                       "compute_weights", "activations", "compute_grads"};
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(p->groups[i].name, order[i]);
  for (const char* g : {"momentum", "variance", "master_grads"}) {
    EXPECT_EQ((*p)[g].bytes, S) << g;
    EXPECT_EQ((*p)[g].dram_bytes, S) << g;
    EXPECT_EQ((*p)[g].tiers, std::vector<std::string>{"dram"}) << g;
    EXPECT_EQ((*p)[g].where.how, runtime::placement::bind) << g;
  }
  const auto& mw = (*p)["master_weights"];
  EXPECT_TRUE(mw.straddles);
  EXPECT_EQ(mw.dram_bytes, S / 2);
  EXPECT_EQ(mw.cxl_bytes, S - S / 2);
  EXPECT_EQ(mw.tiers, (std::vector<std::string>{"dram", "cxl"}));
  EXPECT_EQ((*p)["compute_weights"].bytes, 0) << "fp32 training: no separate compute copies";
  EXPECT_EQ((*p)["compute_grads"].bytes, 0);
  const auto& act = (*p)["activations"];
  ASSERT_NE(t->memory_plan(), nullptr);
  EXPECT_GT(act.bytes, 0);
  EXPECT_EQ(act.bytes, t->memory_plan()->host_bytes) << "the MEMO host bytes of this job";
  EXPECT_EQ(act.cxl_bytes, act.bytes) << "after the budget: CXL";
  EXPECT_EQ(p->dram_bytes, budget);

  // (c) the tensors live in their groups' tier memory, placed as planned.
  const auto* mem = t->tiered_memory();
  ASSERT_NE(mem, nullptr);
  EXPECT_TRUE(inside(t->optimizer().exp_avg(), mem->allocation("momentum")));
  EXPECT_TRUE(inside(t->optimizer().exp_avg_sq(), mem->allocation("variance")));
  EXPECT_TRUE(inside(t->weights(), mem->allocation("master_weights")));
  const void* m0 = t->optimizer().exp_avg().embed.data_ptr();
  const void* w0 = t->weights().embed.data_ptr();
  EXPECT_EQ(runtime::tier_access_of(m0).cxl_fraction, 0.0) << "DRAM groups are not emulated";
  EXPECT_DOUBLE_EQ(runtime::tier_access_of(w0).cxl_fraction, static_cast<double>(S - S / 2) / static_cast<double>(S));
  EXPECT_EQ(runtime::tier_access_of(w0).gbps, 50.0);
  if (runtime::numa_usable() && !mem->allocation("momentum")->fell_back) {
    EXPECT_EQ(mem->allocation("momentum")->policy, "bind");
    EXPECT_EQ(runtime::policy_of(m0), 2) << "MPOL_BIND";
    EXPECT_EQ(runtime::policy_of(t->optimizer().exp_avg_sq().embed.data_ptr()), 2);
    const auto* a = mem->allocation("momentum");
    for (int n : runtime::pages_nodes(a->ptr, a->bytes)) EXPECT_EQ(n, 0);
    // Equal DRAM/CXL shares: plain page interleave over {0} (tier_alloc.h invariant 2).
    EXPECT_EQ(runtime::policy_of(w0), 3) << "MPOL_INTERLEAVE";
  } else {
    std::printf("NUMA policy checks skipped: %s\n", mem->allocation("momentum")->note.c_str());
  }

  // (a) the run: bitwise the run without tiers (MEMO on too: bitwise by its own invariant).
  std::vector<double> losses;
  for (int s = 0; s < 3; ++s) losses.push_back(t->step().loss);
  for (int s = 0; s < 3; ++s) EXPECT_EQ(losses[s], ref[0].losses[s]) << "step " << s;
  EXPECT_TRUE(bitwise_equal(t->weights(), ref[0].weights));
  EXPECT_TRUE(inside(t->optimizer().exp_avg(), mem->allocation("momentum"))) << "steps keep the handles";
  EXPECT_GT(t->memo()->stats().host_bytes, 0u);
  t.reset();
  EXPECT_EQ(runtime::tier_access_of(w0).cxl_fraction, 0.0) << "unregistered when freed";
}

TEST(Trainer, DramOnlyCxlOnlyAndInterleaveAllPlacementsRunBitwiseLikeTheHeap) {
  tmp_dir d;
  const job::JobSpec plain = text_job(d.file("plain"), "{seq_len: 32, micro_batch: 2, grad_accum: 2}", "{dp: 1}", 3);
  const auto ref = run_ranks(plain, 2, false);
  for (const std::string& policy : std::vector<std::string>{"dram_only", "cxl_only", "interleave_all"}) {
    const job::JobSpec spec = tiered_job(d.file(policy), policy, "", false);
    auto t = parallel::make_trainer(spec, {});
    const parallel::cxl::placement_plan* p = t->placement();
    ASSERT_NE(p, nullptr) << policy;
    EXPECT_EQ(parallel::cxl::policy_name(p->policy), policy);
    const int64_t S = (*p)["momentum"].bytes;
    EXPECT_EQ(p->dram_bytes + p->cxl_bytes, 4 * S) << policy;
    const int64_t dram = policy == "dram_only" ? 4 * S : policy == "cxl_only" ? 0 : 2 * S;  // interleave: 1 of 2 nodes
    EXPECT_EQ(p->dram_bytes, dram) << policy;
    const double frac = runtime::tier_access_of(t->optimizer().exp_avg().embed.data_ptr()).cxl_fraction;
    EXPECT_DOUBLE_EQ(frac, policy == "dram_only" ? 0.0 : policy == "cxl_only" ? 1.0 : 0.5) << policy;
    std::vector<double> losses;
    for (int s = 0; s < 2; ++s) losses.push_back(t->step().loss);
    for (int s = 0; s < 2; ++s) EXPECT_EQ(losses[s], ref[0].losses[s]) << policy << " step " << s;
  }
  // The straddle needs a CXL tier: latency_first with a budget below the state and no cxl tier is refused.
  job::JobSpec no_cxl = tiered_job(d.file("nocxl"), "latency_first", "1KiB", false);
  no_cxl.mutable_memory()->mutable_tiers()->RemoveLast();
  try {
    parallel::make_trainer(no_cxl, {});
    ADD_FAILURE() << "no cxl tier for the bytes beyond the budget";
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("no cxl tier is given"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------ misuse

TEST(Trainer, ARankCountThatIsNotDpTimesCpIsRefused) {
  tmp_dir d;
  const job::JobSpec spec = text_job(d.file("run"), "{seq_len: 32, micro_batch: 2, grad_accum: 1}", "{dp: 2}", 1);
  try {
    parallel::make_trainer(spec, {});
    FAIL();
  } catch (const runtime::error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.dp 2 x parallel.cp 1 = 2"), std::string::npos) << e.what();
  }
}

TEST(GradSync, BucketsFollowBackwardOrderAndSumOverRanks) {
  runtime::model_config c;
  c.vocab_size = 16, c.hidden = 8, c.intermediate = 16, c.n_layers = 3, c.n_heads = 2, c.n_kv_heads = 1,
  c.head_dim = 4;
  auto group = runtime::make_inproc_group(2);
  std::vector<model_weights> g(2);
  for (int r = 0; r < 2; ++r) {
    g[r] = model_weights::allocate(c);
    for (auto& p : g[r].parameters())
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = static_cast<float>((r + 1) * (i % 7));
  }
  std::vector<size_t> buckets(2);
  std::vector<std::thread> th;
  for (int r = 0; r < 2; ++r)
    th.emplace_back([&, r] {
      parallel::grad_sync s(g[r], group[r].get(), /*bucket_bytes=*/1);  // one bucket per group
      buckets[r] = s.num_buckets();
      s.begin();
      s.group_ready(parallel::grad_group::head);
      for (int64_t l = 2; l >= 0; --l) s.group_ready(l);
      // the embedding group is never reported: finish() still sends it
      s.finish();
    });
  for (auto& t : th) t.join();
  EXPECT_EQ(buckets[0], 5u);  // head, 3 layers, embedding
  for (auto& p : g[0].parameters())
    for (int64_t i = 0; i < p.value.numel(); ++i)
      ASSERT_EQ(p.value.data<float>()[i], static_cast<float>(3 * (i % 7))) << p.name;
}

}  // namespace
