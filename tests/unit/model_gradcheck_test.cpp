// Finite-difference check of the decoder's full backward: for every parameter tensor of
// micro models (dense with biases, tied + window + yarn, Mixtral, Qwen2-MoE with shared
// expert and dense/sparse layers), central differences of the loss at sampled entries
// must match the analytic gradient. Also: checkpoint round trip and bad checkpoints.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "model_test_util.h"
#include "parallel/model/decoder.h"
#include "runtime/io/safetensors.h"

namespace {

using namespace troupe;
using parallel::decoder;
using parallel::model_weights;

// All MoE routing decisions of the last forward, concatenated over layers.
std::vector<int32_t> routing_of(const decoder& d) {
  std::vector<int32_t> r;
  for (const auto& a : d.saved())
    if (a.moe.topk_idx.defined())
      r.insert(r.end(), a.moe.topk_idx.data<int32_t>(), a.moe.topk_idx.data<int32_t>() + a.moe.topk_idx.numel());
  return r;
}

void gradcheck(const std::string& kind) {
  SCOPED_TRACE(kind);
  const auto cfg = model_test::micro_config(kind);
  model_weights w = model_weights::random_init(cfg, /*seed=*/11, /*std=*/0.4f);
  // Non-zero biases so that they matter for the other gradients too.
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  for (auto& p : w.parameters())
    if (p.value.ndim() == 1 && p.name.find("norm") == std::string::npos)
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = nd(rng);
  const int64_t B = 2, T = 6;
  const auto ids = model_test::random_ids(B * T, cfg.vocab_size, 7);
  auto targets = parallel::shift_targets(ids, B, T);
  targets[2] = -1;  // an ignored position in the middle
  decoder dec(w);
  model_weights g = model_weights::zeros_like(w);
  const float loss = dec.forward_backward(ids.data(), targets.data(), B, T, g);
  EXPECT_NEAR(dec.forward_loss(ids.data(), targets.data(), B, T), loss, 1e-6);
  const auto routing = routing_of(dec);

  const float eps = 1e-2f;
  int checked = 0, skipped = 0, tensors = 0;
  double overall = 0.0;
  auto grads = g.parameters();
  auto params = w.parameters();
  ASSERT_EQ(grads.size(), params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    ASSERT_EQ(params[t].name, grads[t].name);
    float* p = params[t].value.data<float>();
    const float* gp = grads[t].value.data<float>();
    const int64_t n = params[t].value.numel();
    std::uniform_int_distribution<int64_t> pick(0, n - 1);
    double worst = 0.0;
    for (int s = 0; s < 4; ++s) {
      const int64_t i = s == 0 ? 0 : pick(rng);
      const float saved = p[i];
      p[i] = saved + eps;
      const double lp = dec.forward_loss(ids.data(), targets.data(), B, T);
      const bool same_p = routing_of(dec) == routing;
      p[i] = saved - eps;
      const double lm = dec.forward_loss(ids.data(), targets.data(), B, T);
      const bool same_m = routing_of(dec) == routing;
      p[i] = saved;
      if (!same_p || !same_m) {  // top-k flipped: the loss is not differentiable across it
        ++skipped;
        continue;
      }
      const double num = (lp - lm) / (2.0 * eps);
      const double ana = gp[i];
      const double err = std::abs(num - ana) / (1e-3 + 0.02 * std::max(std::abs(num), std::abs(ana)));
      worst = std::max(worst, err);
      EXPECT_LE(err, 1.0) << params[t].name << "[" << i << "]: numeric " << num << " analytic " << ana;
      ++checked;
    }
    ++tensors;
    overall = std::max(overall, worst);
  }
  EXPECT_EQ(tensors, static_cast<int>(params.size()));
  EXPECT_GE(checked, 3 * tensors) << "too many entries skipped for top-k flips: " << skipped;
  std::printf("[gradcheck %s] %d tensors, %d entries checked, %d skipped (top-k flip), worst error %.3f of the bound\n",
              kind.c_str(), tensors, checked, skipped, overall);
}

TEST(ModelGradcheck, DenseLlamaBiasesLlama3Rope) { gradcheck("llama"); }
TEST(ModelGradcheck, MistralTiedWindowYarn) { gradcheck("mistral_tied"); }
TEST(ModelGradcheck, Mixtral) { gradcheck("mixtral"); }
TEST(ModelGradcheck, Qwen2MoeSharedExpertSparseStep) { gradcheck("qwen2_moe"); }
TEST(ModelGradcheck, Qwen2MoeAllSparseNormalized) { gradcheck("qwen2_moe_all"); }

TEST(ModelGradcheck, GradientsAccumulate) {
  const auto cfg = model_test::micro_config("qwen2_moe");
  model_weights w = model_weights::random_init(cfg, 3, 0.3f);
  const auto ids = model_test::random_ids(8, cfg.vocab_size, 1);
  const auto targets = parallel::shift_targets(ids, 2, 4);
  decoder dec(w);
  model_weights g1 = model_weights::zeros_like(w), g2 = model_weights::zeros_like(w);
  dec.forward_backward(ids.data(), targets.data(), 2, 4, g1);
  dec.forward_backward(ids.data(), targets.data(), 2, 4, g2);
  dec.forward_backward(ids.data(), targets.data(), 2, 4, g2);
  auto a = g1.parameters(), b = g2.parameters();
  for (size_t t = 0; t < a.size(); ++t)
    for (int64_t i = 0; i < a[t].value.numel(); ++i)
      ASSERT_NEAR(2.0f * a[t].value.data<float>()[i], b[t].value.data<float>()[i], 1e-5f) << a[t].name;
}

// --- checkpoints -------------------------------------------------------------------

std::string temp_dir(const std::string& tag) {
  auto d = std::filesystem::temp_directory_path() / ("troupe_model_test_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  return d.string();
}

TEST(ModelCheckpoint, SaveLoadRoundTrip) {
  const auto cfg = model_test::micro_config("qwen2_moe");
  model_weights w = model_weights::random_init(cfg, 9);
  const std::string dir = temp_dir("roundtrip");
  w.save(dir);
  model_weights r = model_weights::load(dir);
  auto a = w.parameters(), b = r.parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t t = 0; t < a.size(); ++t) {
    ASSERT_EQ(a[t].name, b[t].name);
    ASSERT_EQ(a[t].value.shape(), b[t].value.shape());
    for (int64_t i = 0; i < a[t].value.numel(); ++i)
      ASSERT_EQ(a[t].value.data<float>()[i], b[t].value.data<float>()[i]) << a[t].name;
  }
  EXPECT_EQ(r.parameter_count(), w.parameter_count());
  int64_t from_specs = 0;
  for (const auto& [name, shape] : model_weights::specs(cfg)) from_specs += runtime::shape_numel(shape);
  EXPECT_EQ(from_specs, w.parameter_count());
  std::filesystem::remove_all(dir);
}

// Rewrites dir/model.safetensors with `edit` applied to the tensor list.
void rewrite(const std::string& dir,
             const std::function<void(std::vector<std::pair<std::string, runtime::tensor>>&)>& edit) {
  auto f = runtime::safetensors_file::open(dir + "/model.safetensors");
  std::vector<std::pair<std::string, runtime::tensor>> ts;
  for (const auto& n : f.names()) ts.emplace_back(n, f.get(n).clone());
  edit(ts);
  runtime::safetensors_write(dir + "/model.safetensors", ts);
}

TEST(ModelCheckpoint, MissingTensorIsNamed) {
  const auto cfg = model_test::micro_config("mixtral");
  const std::string dir = temp_dir("missing");
  model_weights::random_init(cfg, 1).save(dir);
  const std::string victim = "model.layers.0.block_sparse_moe.experts.2.w3.weight";
  rewrite(dir, [&](auto& ts) {
    std::erase_if(ts, [&](const auto& p) { return p.first == victim; });
  });
  try {
    model_weights::load(dir);
    FAIL() << "load accepted a checkpoint without " << victim;
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::not_found);
    EXPECT_NE(std::string(e.what()).find(victim), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(dir), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(ModelCheckpoint, WrongShapeIsNamed) {
  const auto cfg = model_test::micro_config("llama");
  const std::string dir = temp_dir("shape");
  model_weights::random_init(cfg, 1).save(dir);
  const std::string victim = "model.layers.1.self_attn.k_proj.weight";  // expected (4, 8)
  rewrite(dir, [&](auto& ts) {
    for (auto& p : ts)
      if (p.first == victim) p.second = runtime::tensor::zeros({5, 8}, runtime::dtype::bf16);
  });
  try {
    model_weights::load(dir);
    FAIL() << "load accepted a misshaped " << victim;
  } catch (const runtime::error& e) {
    EXPECT_EQ(e.code(), runtime::errc::format);
    const std::string m = e.what();
    EXPECT_NE(m.find(victim), std::string::npos) << m;
    EXPECT_NE(m.find("[5, 8]"), std::string::npos) << m;
    EXPECT_NE(m.find("[4, 8]"), std::string::npos) << m;
  }
  std::filesystem::remove_all(dir);
}

TEST(ModelCheckpoint, LoadsBf16) {
  const auto cfg = model_test::micro_config("llama");
  const std::string dir = temp_dir("bf16");
  model_weights w = model_weights::random_init(cfg, 4);
  w.save(dir);
  rewrite(dir, [&](auto& ts) {
    for (auto& p : ts) p.second = p.second.to(runtime::dtype::bf16);
  });
  model_weights r = model_weights::load(dir);
  auto a = w.parameters(), b = r.parameters();
  for (size_t t = 0; t < a.size(); ++t)
    for (int64_t i = 0; i < a[t].value.numel(); ++i)
      ASSERT_NEAR(a[t].value.data<float>()[i], b[t].value.data<float>()[i],
                  std::abs(a[t].value.data<float>()[i]) * 1e-2f);
  std::filesystem::remove_all(dir);
}

}  // namespace
