// The decoder against HF transformers: for every fixture made by
// tests/fixtures/make_fixtures.py, logits, loss (labels = input_ids) and the gradient of
// every parameter must match torch within max|a-b|/max|b| <= 1e-4 (logits, loss) and
// 1e-3 (gradients). A missing fixture fails the test.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "model_test_util.h"
#include "parallel/model/decoder.h"
#include "runtime/io/safetensors.h"

namespace {

using namespace troupe;
using parallel::decoder;
using parallel::model_weights;
using runtime::tensor;

std::vector<int32_t> ids_of(const tensor& t) {
  tensor i32 = t.to(runtime::dtype::i32);
  return {i32.data<int32_t>(), i32.data<int32_t>() + i32.numel()};
}

class ModelFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelFixture, LogitsLossAndEveryGradientMatchHF) {
  const std::string dir = model_test::fixture_dir(GetParam());
  ASSERT_TRUE(std::filesystem::exists(dir + "/expected.safetensors"))
      << dir << " is missing; run tests/fixtures/make_fixtures.py";
  model_weights w = model_weights::load(dir);
  auto ex = runtime::safetensors_file::open(dir + "/expected.safetensors");
  const tensor input_ids = ex.get("input_ids");
  ASSERT_EQ(input_ids.ndim(), 2);
  const int64_t B = input_ids.size(0), T = input_ids.size(1), V = w.config().vocab_size;
  const auto ids = ids_of(input_ids);
  decoder dec(w);

  // Logits.
  tensor logits = dec.forward_logits(ids.data(), B, T);
  tensor ref_logits = ex.get_as("logits", runtime::dtype::f32, {B, T, V});
  const double e_logits = model_test::rel_err(logits.data<float>(), ref_logits.data<float>(), logits.numel());
  EXPECT_LE(e_logits, 1e-4) << "logits";

  // Loss and gradients.
  const auto targets = parallel::shift_targets(ids, B, T);
  model_weights g = model_weights::zeros_like(w);
  const float loss = dec.forward_backward(ids.data(), targets.data(), B, T, g);
  const double ref_loss = ex.get_as("loss", runtime::dtype::f32).data<float>()[0];
  EXPECT_LE(std::abs(loss - ref_loss) / std::abs(ref_loss), 1e-4) << "loss " << loss << " vs HF " << ref_loss;

  std::string worst_name;
  double worst = 0.0;
  std::set<std::string> ours;
  for (auto& p : g.parameters()) {
    const std::string key = "grad." + p.name;
    ours.insert(key);
    ASSERT_TRUE(ex.contains(key)) << key << " missing from the fixture";
    tensor ref = ex.get_as(key, runtime::dtype::f32, p.value.shape());
    const double e = model_test::rel_err(p.value.data<float>(), ref.data<float>(), p.value.numel());
    EXPECT_LE(e, 1e-3) << p.name;
    if (e > worst) {
      worst = e;
      worst_name = p.name;
    }
  }
  for (const auto& n : ex.names())
    if (n.rfind("grad.", 0) == 0) {
      EXPECT_TRUE(ours.count(n)) << n << " in the fixture is not a parameter of ours";
    }
  std::printf("[fixture %s] logits rel err %.2e, loss %.6f vs %.6f, worst grad %s rel err %.2e (%zu tensors)\n",
              GetParam().c_str(), e_logits, loss, ref_loss, worst_name.c_str(), worst, ours.size());
}

INSTANTIATE_TEST_SUITE_P(HF, ModelFixture, ::testing::ValuesIn(model_test::fixture_names()),
                         [](const auto& info) { return info.param; });

}  // namespace
