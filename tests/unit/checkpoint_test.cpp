// tests/unit/checkpoint_test.cpp — training checkpoints: bitwise round trips (every preset),
// crash-mid-save leftovers, damaged files with their messages, pruning and `latest`.
//
// CheckpointExport.AllPresets also serves tests/integration/checkpoint_hf_load.py: with
// TROUPE_CHECKPOINT_EXPORT_DIR set it leaves <dir>/<label>/step-00000007 (+ latest) there
// for transformers to load; without it, it writes to a temporary dir and removes it.
#include "parallel/train/checkpoint.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "parallel/model/model_presets.h"
#include "runtime/error.h"
#include "runtime/io/safetensors.h"
#include "tests/unit/tmp_dir.h"
#include "tests/unit/expect_error.h"

namespace fs = std::filesystem;
using namespace troupe::parallel;
using troupe::runtime::errc;
using troupe::runtime::error;
using troupe::runtime::tensor;

namespace {

using troupe_test::expect_error;

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// A small Llama (2 layers) so that every test stays fast.
troupe::runtime::model_config small_config() {
  auto c = model_preset("tiny-llama");
  c.n_layers = 2;
  return c;
}

// Three sets (weights, exp_avg, exp_avg_sq) of the same layout; the moments carry a few
// special values (-0, denormal, inf, NaN with a payload) so "bitwise" means bitwise.
struct train_sets {
  model_weights w, m, v;
};

train_sets make_sets(const troupe::runtime::model_config& c, uint64_t seed) {
  train_sets s{model_weights::random_init(c, seed), model_weights::random_init(c, seed + 1, 1e-3f),
               model_weights::random_init(c, seed + 2, 1e-6f)};
  float* p = s.m.embed.data<float>();
  p[0] = -0.0f;
  p[1] = std::numeric_limits<float>::denorm_min();
  p[2] = std::numeric_limits<float>::infinity();
  uint32_t nan_bits = 0x7fc01234u;
  std::memcpy(&p[3], &nan_bits, 4);
  return s;
}

nlohmann::json make_state(int64_t pos) {
  return {{"data", {{"epoch", 2}, {"position", pos}, {"seed", 1234}}},
          {"rng", "0123456789abcdef0123456789abcdef"},
          {"lr", 3.0e-4},
          {"loss_history", {2.5, 2.25, 2.125}},
          {"spec", {{"model", "tiny-llama"}, {"seq_len", 64}}}};
}

void expect_bitwise_equal(const model_weights& a, const model_weights& b, const char* what) {
  const auto pa = a.parameters();
  const auto pb = b.parameters();
  ASSERT_EQ(pa.size(), pb.size()) << what;
  for (size_t i = 0; i < pa.size(); ++i) {
    ASSERT_EQ(pa[i].first, pb[i].first) << what;
    ASSERT_EQ(pa[i].second.shape(), pb[i].second.shape()) << what << " " << pa[i].first;
    ASSERT_EQ(pb[i].second.dtype(), troupe::runtime::dtype::f32);
    EXPECT_EQ(std::memcmp(pa[i].second.data_ptr(), pb[i].second.data_ptr(), pa[i].second.nbytes()), 0)
        << what << " " << pa[i].first << " differs";
  }
}

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

std::string save(const std::string& root, int64_t step, const train_sets& s, int64_t keep = 0) {
  return save_checkpoint(root, step, s.w, s.m, s.v, make_state(step * 100), keep);
}

// Rewrites optimizer.safetensors of dir through f(list of (name, tensor)).
template <typename F>
void rewrite_optimizer(const std::string& dir, F&& f) {
  const std::string path = dir + "/optimizer.safetensors";
  std::vector<std::pair<std::string, tensor>> tensors;
  {
    auto file = troupe::runtime::safetensors_file::open(path);
    for (const auto& n : file.names()) tensors.emplace_back(n, file.get(n).clone());
  }
  f(tensors);
  troupe::runtime::safetensors_write(path, tensors, {{"format", "pt"}});
}

}  // namespace

TEST(Checkpoint, RoundTripIsBitwise) {
  tmp_dir tmp;
  const std::string root = tmp.file("run");
  const train_sets s = make_sets(small_config(), 11);
  nlohmann::json state = make_state(4242);
  state["step"] = 999;  // overwritten by save
  const std::string dir = save_checkpoint(root, 123, s.w, s.m, s.v, state, 0);
  EXPECT_EQ(dir, root + "/step-00000123");
  EXPECT_EQ(entries(dir),
            (std::set<std::string>{"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}));
  EXPECT_EQ(entries(root), (std::set<std::string>{"latest", "step-00000123"}));
  EXPECT_EQ(read_text(root + "/latest"), "step-00000123\n");
  EXPECT_EQ(latest_checkpoint(root), dir);
  // trainer_state.json is pretty JSON.
  EXPECT_HAS(read_text(dir + "/trainer_state.json"), "\n  \"step\": 123");

  nlohmann::json expected_state = make_state(4242);
  expected_state["step"] = 123;
  for (const std::string& path : {root, dir, dir + "/"}) {
    SCOPED_TRACE(path);
    const checkpoint_contents c = load_checkpoint(path);
    EXPECT_EQ(c.dir, dir);
    EXPECT_EQ(c.step, 123);
    EXPECT_EQ(c.state, expected_state);
    EXPECT_EQ(c.weights.config().n_layers, 2);
    expect_bitwise_equal(s.w, c.weights, "weights");
    expect_bitwise_equal(s.m, c.exp_avg, "exp_avg");
    expect_bitwise_equal(s.v, c.exp_avg_sq, "exp_avg_sq");
  }
  // Model only (fine-tuning from a training checkpoint).
  expect_bitwise_equal(s.w, model_weights::load(dir), "model_weights::load");
}

TEST(Checkpoint, ResavingAStepReplacesIt) {
  tmp_dir tmp;
  const std::string root = tmp.file("run");
  const auto c = small_config();
  save(root, 5, make_sets(c, 1));
  const train_sets second = make_sets(c, 50);
  save(root, 5, second);
  const checkpoint_contents got = load_checkpoint(root);
  expect_bitwise_equal(second.w, got.weights, "weights");
  expect_bitwise_equal(second.v, got.exp_avg_sq, "exp_avg_sq");
  EXPECT_EQ(entries(root), (std::set<std::string>{"latest", "step-00000005"}));
}

TEST(Checkpoint, CrashMidSaveKeepsThePreviousOne) {
  tmp_dir tmp;
  const std::string root = tmp.file("run");
  const auto c = small_config();
  const train_sets good = make_sets(c, 3);
  const std::string dir1 = save(root, 1, good);

  // A save of step 2 died while writing model.safetensors: a partial tmp dir with a
  // truncated file, and a half-written `latest` temp file.
  const std::string stale = root + "/.tmp-step-00000002-999999";
  fs::create_directories(stale);
  fs::copy_file(dir1 + "/config.json", stale + "/config.json");
  const std::string model = read_text(dir1 + "/model.safetensors");
  write_text(stale + "/model.safetensors", model.substr(0, model.size() / 3));
  write_text(stale + "/optimizer.safetensors.tmp", model.substr(0, 1000));
  write_text(root + "/.tmp-latest-999999", "step-0000");

  EXPECT_EQ(latest_checkpoint(root), dir1);
  checkpoint_contents got = load_checkpoint(root);
  EXPECT_EQ(got.step, 1);
  expect_bitwise_equal(good.w, got.weights, "weights");
  expect_bitwise_equal(good.m, got.exp_avg, "exp_avg");

  // A crash between moving an old step-2 aside and moving the new one in: `latest` names a
  // dir that is not there.
  write_text(root + "/latest", "step-00000002\n");
  EXPECT_EQ(latest_checkpoint(root), dir1);
  EXPECT_EQ(load_checkpoint(root).step, 1);

  // The next save removes the leftovers.
  const train_sets next = make_sets(c, 30);
  const std::string dir2 = save(root, 2, next);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(root + "/.tmp-latest-999999"));
  EXPECT_EQ(entries(root), (std::set<std::string>{"latest", "step-00000001", "step-00000002"}));
  EXPECT_EQ(latest_checkpoint(root), dir2);
  expect_bitwise_equal(next.w, load_checkpoint(root).weights, "weights");
}

TEST(Checkpoint, DamagedFilesNameTheFileAndTensor) {
  tmp_dir tmp;
  const auto c = small_config();
  const train_sets s = make_sets(c, 7);
  const std::string good = save(tmp.file("good"), 7, s);
  int n = 0;
  // A fresh copy of the good checkpoint, named step-00000007 like the original.
  auto fresh = [&]() {
    const std::string root = tmp.file(fmt::format("bad{}", n++));
    const std::string dir = root + "/step-00000007";
    fs::create_directories(root);
    fs::copy(good, dir, fs::copy_options::recursive);
    return dir;
  };
  const std::string opt = "optimizer.safetensors";
  const std::string missing = "exp_avg.model.layers.1.self_attn.k_proj.weight";

  {  // Truncated optimizer file.
    const std::string dir = fresh();
    fs::resize_file(dir + "/" + opt, fs::file_size(dir + "/" + opt) / 2);
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), dir + "/" + opt);
    EXPECT_HAS(e.what(), "exp_avg");
    // Not complete, so a root holding only it has no checkpoint.
    const std::string root = fs::path(dir).parent_path().string();
    EXPECT_EQ(latest_checkpoint(root), "");
    EXPECT_EQ(expect_error([&] { load_checkpoint(root); }).code(), errc::not_found);
  }
  {  // Garbage header.
    const std::string dir = fresh();
    std::string bytes = read_text(dir + "/" + opt);
    bytes.replace(8, 16, "{\"exp_avg.x\": [1");
    write_text(dir + "/" + opt, bytes);
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), opt);
  }
  {  // One first moment missing.
    const std::string dir = fresh();
    rewrite_optimizer(dir, [&](auto& ts) { std::erase_if(ts, [&](const auto& p) { return p.first == missing; }); });
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), dir + "/" + opt);
    EXPECT_HAS(e.what(), "\"" + missing + "\"");
  }
  {  // A second moment of the wrong shape.
    const std::string dir = fresh();
    rewrite_optimizer(dir, [&](auto& ts) {
      for (auto& [name, t] : ts)
        if (name == "exp_avg_sq.model.norm.weight") t = tensor::zeros({64});
    });
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), "\"exp_avg_sq.model.norm.weight\" has shape [64], expected [128]");
  }
  {  // A tensor that belongs to no parameter.
    const std::string dir = fresh();
    rewrite_optimizer(dir, [&](auto& ts) { ts.emplace_back("exp_avg.model.layers.9.mlp.up_proj.weight", tensor::zeros({2})); });
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), "unexpected tensor \"exp_avg.model.layers.9.mlp.up_proj.weight\"");
  }
  {  // trainer_state.json from another step.
    const std::string dir = fresh();
    auto st = nlohmann::json::parse(read_text(dir + "/trainer_state.json"));
    st["step"] = 8;
    write_text(dir + "/trainer_state.json", st.dump(2));
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), dir + "/trainer_state.json");
    EXPECT_HAS(e.what(), "\"step\" is 8 but the directory step-00000007 is step 7");
    EXPECT_EQ(latest_checkpoint(fs::path(dir).parent_path().string()), "");
  }
  {  // trainer_state.json cut short, or without a step.
    const std::string dir = fresh();
    write_text(dir + "/trainer_state.json", "{\"step\": 7, \"data\": {");
    error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), "trainer_state.json: not valid JSON");
    write_text(dir + "/trainer_state.json", "{\"data\": 1}");
    e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), "trainer_state.json: key \"step\" is missing");
  }
  {  // A model tensor missing (model_weights::load names it).
    const std::string dir = fresh();
    const std::string path = dir + "/model.safetensors";
    std::vector<std::pair<std::string, tensor>> ts;
    {
      auto f = troupe::runtime::safetensors_file::open(path);
      for (const auto& name : f.names())
        if (name != "model.layers.0.mlp.down_proj.weight") ts.emplace_back(name, f.get(name).clone());
    }
    troupe::runtime::safetensors_write(path, ts);
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), "\"model.layers.0.mlp.down_proj.weight\" is missing");
  }
  {  // No optimizer file at all.
    const std::string dir = fresh();
    fs::remove(dir + "/" + opt);
    const error e = expect_error([&] { load_checkpoint(dir); });
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), dir + "/" + opt + ": missing");
  }
  // The original is untouched and still loads.
  expect_bitwise_equal(s.m, load_checkpoint(good).exp_avg, "exp_avg");
}

TEST(Checkpoint, KeepPrunesAndLatestFallsBack) {
  tmp_dir tmp;
  const std::string root = tmp.file("run");
  const auto c = small_config();
  const train_sets s = make_sets(c, 5);
  for (int64_t step = 10; step <= 50; step += 10) {
    const std::string dir = save(root, step, s, /*keep=*/2);
    EXPECT_EQ(latest_checkpoint(root), dir);
    std::set<std::string> want{"latest", checkpoint_dir_name(step)};
    if (step > 10) want.insert(checkpoint_dir_name(step - 10));
    EXPECT_EQ(entries(root), want) << "after step " << step;
  }
  // `latest` may name an older complete dir: it is followed.
  write_text(root + "/latest", "step-00000040\n");
  EXPECT_EQ(latest_checkpoint(root), root + "/step-00000040");
  EXPECT_EQ(load_checkpoint(root).step, 40);
  // Corrupt or dangling `latest`: the newest complete dir.
  for (const std::string& bad : {std::string("\x01\xff garbage"), std::string(""), std::string("step-00000090\n"),
                                std::string("../step-00000040\n")}) {
    write_text(root + "/latest", bad);
    EXPECT_EQ(latest_checkpoint(root), root + "/step-00000050") << "latest = '" << bad << "'";
  }
  fs::remove(root + "/latest");
  EXPECT_EQ(latest_checkpoint(root), root + "/step-00000050");
  // The newest dir damaged too: the one before it.
  write_text(root + "/latest", "garbage");
  fs::resize_file(root + "/step-00000050/model.safetensors", 100);
  EXPECT_EQ(latest_checkpoint(root), root + "/step-00000040");
  EXPECT_EQ(load_checkpoint(root).step, 40);

  // Saving an older step (a rollback) keeps it plus the newest other.
  save(root, 20, s, /*keep=*/2);
  EXPECT_EQ(entries(root), (std::set<std::string>{"latest", "step-00000020", "step-00000050"}));
  EXPECT_EQ(latest_checkpoint(root), root + "/step-00000020");
  // keep 0 keeps everything.
  save(root, 60, s, 0);
  save(root, 70, s, 0);
  EXPECT_EQ(entries(root).size(), 5u);
  EXPECT_EQ(latest_checkpoint(root), root + "/step-00000070");
  EXPECT_EQ(latest_checkpoint(tmp.file("nothing-here")), "");
}

TEST(Checkpoint, BadArgumentsWriteNothing) {
  tmp_dir tmp;
  const std::string root = tmp.file("run");
  const auto c = small_config();
  const train_sets s = make_sets(c, 9);
  auto other = c;
  other.intermediate = 256;
  const model_weights wrong = model_weights::allocate(other);
  error e = expect_error([&] { save_checkpoint(root, 1, s.w, wrong, s.v, {}, 0); });
  EXPECT_EQ(e.code(), errc::invalid_argument);
  EXPECT_HAS(e.what(), "exp_avg parameter 7 is \"model.layers.0.mlp.gate_proj.weight\" [256, 128]");
  e = expect_error([&] { save_checkpoint(root, -1, s.w, s.m, s.v, {}, 0); });
  EXPECT_EQ(e.code(), errc::invalid_argument);
  e = expect_error([&] { save_checkpoint(root, 1, s.w, s.m, s.v, nlohmann::json::array(), 0); });
  EXPECT_EQ(e.code(), errc::invalid_argument);
  EXPECT_FALSE(fs::exists(root));
  // A null state becomes {"step": N}.
  save_checkpoint(root, 3, s.w, s.m, s.v, nullptr, 0);
  EXPECT_EQ(load_checkpoint(root).state, (nlohmann::json{{"step", 3}}));
}

// Every preset (and a tied-embedding Llama) round-trips bitwise; with
// TROUPE_CHECKPOINT_EXPORT_DIR set the checkpoints stay there for checkpoint_hf_load.py.
TEST(CheckpointExport, AllPresets) {
  tmp_dir tmp;
  const char* env = std::getenv("TROUPE_CHECKPOINT_EXPORT_DIR");
  const std::string out = env && *env ? std::string(env) : tmp.file("export");
  std::vector<std::pair<std::string, troupe::runtime::model_config>> configs;
  for (const auto& name : model_preset_names()) configs.emplace_back(name, model_preset(name));
  auto tied = model_preset("tiny-llama");
  tied.tie_word_embeddings = true;
  configs.emplace_back("tiny-llama-tied", tied);
  uint64_t seed = 100;
  for (const auto& [label, cfg] : configs) {
    SCOPED_TRACE(label);
    const train_sets s = make_sets(cfg, seed += 10);
    const std::string root = out + "/" + label;
    const std::string dir = save_checkpoint(root, 7, s.w, s.m, s.v, make_state(1), 2);
    const checkpoint_contents c = load_checkpoint(root);
    EXPECT_EQ(c.dir, dir);
    EXPECT_EQ(c.weights.config().family, cfg.family);
    EXPECT_EQ(c.weights.config().tie_word_embeddings, cfg.tie_word_embeddings);
    expect_bitwise_equal(s.w, c.weights, "weights");
    expect_bitwise_equal(s.m, c.exp_avg, "exp_avg");
    expect_bitwise_equal(s.v, c.exp_avg_sq, "exp_avg_sq");
  }
}
