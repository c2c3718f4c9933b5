// tests/unit/tier_registry_test.cpp — the emulated-tier range registry (runtime/tier_registry.h):
// register / look up / unregister, overlapping ranges rejected, the emulated_seconds formula,
// emulate_access waiting at least its time; and the CPU AdamW (parallel/train/optimizer.h) over
// moments registered on an emulated tier: bitwise the same result as without and as the unblocked
// kernel, and at least the emulated time.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "parallel/model/model_weights.h"
#include "parallel/train/optimizer.h"
#include "runtime/error.h"
#include "runtime/tier_registry.h"

using namespace troupe;
using runtime::tier_access;
using clk = std::chrono::steady_clock;

namespace {

double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

// Unregisters what a test registered, also when an assertion fails half way.
struct registered {
  std::vector<const void*> starts;
  void add(const void* p, size_t bytes, tier_access a) {
    runtime::register_tier_range(p, bytes, a);
    starts.push_back(p);
  }
  ~registered() {
    for (const void* p : starts) runtime::unregister_tier_range(p);
  }
};

void expect_access_eq(const tier_access& got, const tier_access& want) {
  EXPECT_EQ(got.cxl_fraction, want.cxl_fraction);
  EXPECT_EQ(got.gbps, want.gbps);
  EXPECT_EQ(got.latency_ns, want.latency_ns);
}

TEST(TierRegistry, LooksUpEveryByteOfARangeAndNothingOutsideIt) {
  std::vector<char> buf(4096);
  const char* p = buf.data();
  const tier_access a{.cxl_fraction = 0.5, .gbps = 20, .latency_ns = 300};
  {
    registered r;
    r.add(p + 1024, 1024, a);
    expect_access_eq(runtime::tier_access_of(p + 1024), a);
    expect_access_eq(runtime::tier_access_of(p + 2047), a);
    expect_access_eq(runtime::tier_access_of(p + 2048), {});
    expect_access_eq(runtime::tier_access_of(p + 1023), {});
    expect_access_eq(runtime::tier_access_of(p), {});
    runtime::unregister_tier_range(p + 1500);  // starts no range: no-op
    expect_access_eq(runtime::tier_access_of(p + 1500), a);
  }
  expect_access_eq(runtime::tier_access_of(p + 1024), {});
  EXPECT_EQ(runtime::emulated_seconds(p + 1024, 1024), 0.0);
}

TEST(TierRegistry, RejectsOverlapsButTakesAdjacentRanges) {
  std::vector<char> buf(4096);
  const char* p = buf.data();
  const tier_access a{.cxl_fraction = 1, .gbps = 10, .latency_ns = 0};
  const tier_access b{.cxl_fraction = 0.25, .gbps = 5, .latency_ns = 100};
  registered r;
  r.add(p + 1024, 1024, a);
  for (auto [off, len] : std::vector<std::pair<size_t, size_t>>{{512, 1024}, {1536, 1024}, {1024, 1}, {0, 4096}}) {
    try {
      runtime::register_tier_range(p + off, len, b);
      r.starts.push_back(p + off);
      ADD_FAILURE() << "[" << off << ", +" << len << ") overlaps [1024, +1024) but was registered";
    } catch (const runtime::error& e) {
      EXPECT_EQ(e.code(), runtime::errc::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("overlaps"), std::string::npos) << e.what();
    }
  }
  // The rejected ranges left nothing behind.
  expect_access_eq(runtime::tier_access_of(p + 600), {});
  expect_access_eq(runtime::tier_access_of(p + 2100), {});
  r.add(p, 1024, b);          // ends where the first starts
  r.add(p + 2048, 2048, b);   // starts where the first ends
  expect_access_eq(runtime::tier_access_of(p + 1023), b);
  expect_access_eq(runtime::tier_access_of(p + 1024), a);
  expect_access_eq(runtime::tier_access_of(p + 2047), a);
  expect_access_eq(runtime::tier_access_of(p + 2048), b);
}

TEST(TierRegistry, RejectsEmptyRangesAndImpossibleAccesses) {
  std::vector<char> buf(64);
  for (const tier_access& bad : {tier_access{.cxl_fraction = 1.5}, tier_access{.cxl_fraction = -0.1},
                                 tier_access{.cxl_fraction = 1, .gbps = -1}, tier_access{.latency_ns = -5}})
    EXPECT_THROW(runtime::register_tier_range(buf.data(), buf.size(), bad), runtime::error);
  EXPECT_THROW(runtime::register_tier_range(nullptr, 64, {}), runtime::error);
  EXPECT_THROW(runtime::register_tier_range(buf.data(), 0, {}), runtime::error);
  expect_access_eq(runtime::tier_access_of(buf.data()), {});
}

TEST(TierRegistry, EmulatedSecondsIsTheCxlShareOverTheCapPlusTheLatency) {
  std::vector<char> buf(3 << 10);
  const char* p = buf.data();
  registered r;
  r.add(p, 1024, {.cxl_fraction = 0.25, .gbps = 2, .latency_ns = 300});
  r.add(p + 1024, 1024, {.cxl_fraction = 1, .gbps = 0, .latency_ns = 250});  // no bandwidth term
  r.add(p + 2048, 1024, {.cxl_fraction = 0, .gbps = 2, .latency_ns = 300});   // all on DRAM: free
  EXPECT_DOUBLE_EQ(runtime::emulated_seconds(p, 1'000'000), 0.25 * 1e6 / 2e9 + 300e-9);
  EXPECT_DOUBLE_EQ(runtime::emulated_seconds(p + 10, 4'000'000'000), 0.25 * 4e9 / 2e9 + 300e-9);
  EXPECT_DOUBLE_EQ(runtime::emulated_seconds(p + 1024, 1'000'000), 250e-9);
  EXPECT_EQ(runtime::emulated_seconds(p + 2048, 1'000'000), 0.0);
  std::vector<char> other(16);
  EXPECT_EQ(runtime::emulated_seconds(other.data(), 1'000'000), 0.0);
}

TEST(TierRegistry, EmulateAccessWaitsAtLeastTheTimeFromT0) {
  auto t0 = clk::now();
  runtime::emulate_access(t0, 0.02);
  EXPECT_GE(seconds_since(t0), 0.02);
  // Measured from t0, not from the call: work done since t0 counts.
  t0 = clk::now();
  while (seconds_since(t0) < 0.01) {
  }
  runtime::emulate_access(t0, 0.03);
  EXPECT_GE(seconds_since(t0), 0.03);
  // Already past, zero or negative: returns (no upper bound is asserted).
  runtime::emulate_access(clk::now() - std::chrono::seconds(1), 0.01);
  runtime::emulate_access(clk::now(), 0.0);
  runtime::emulate_access(clk::now(), -1.0);
}

// A model with one parameter of several optimizer blocks (2^18 elements): embed 4096 x 160.
runtime::model_config small_config() {
  runtime::model_config c;
  c.vocab_size = 4096, c.hidden = 160, c.intermediate = 320, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2,
  c.head_dim = 40;
  return c;
}

bool bitwise_equal(const parallel::model_weights& a, const parallel::model_weights& b) {
  const auto pa = a.parameters(), pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (size_t i = 0; i < pa.size(); ++i)
    if (pa[i].second.numel() != pb[i].second.numel() ||
        std::memcmp(pa[i].second.data<float>(), pb[i].second.data<float>(),
                    static_cast<size_t>(pa[i].second.numel()) * sizeof(float)) != 0) {
      ADD_FAILURE() << pa[i].first << " differs";
      return false;
    }
  return true;
}

TEST(OptimizerOnTiers, AdamWOverEmulatedMomentsIsBitwiseTheSameAndTakesTheEmulatedTime) {
  const runtime::model_config c = small_config();
  parallel::model_weights w_plain = parallel::model_weights::random_init(c, 3, 0.5f);
  parallel::model_weights w_tier = parallel::model_weights::random_init(c, 3, 0.5f);
  const parallel::model_weights grads = parallel::model_weights::random_init(c, 11, 0.5f);
  ASSERT_GT(w_plain.embed.numel(), 2 << 18) << "the test wants a parameter of several blocks";
  const parallel::adamw_config cfg{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  parallel::adamw plain(w_plain, cfg), tier(w_tier, cfg);

  // Every moment tensor on an emulated CXL tier capped at 0.5 GB/s: the moments' share alone
  // must take 8 bytes per parameter / 0.5e9 per step at least.
  const tier_access slow{.cxl_fraction = 1, .gbps = 0.5, .latency_ns = 300};
  registered r;
  int64_t moment_bytes = 0;
  for (parallel::model_weights* set : {&tier.exp_avg(), &tier.exp_avg_sq()})
    for (auto& p : set->parameters()) {
      const auto bytes = static_cast<size_t>(p.value.numel()) * sizeof(float);
      r.add(p.value.data<float>(), bytes, slow);
      moment_bytes += static_cast<int64_t>(bytes);
    }
  const double floor_s = static_cast<double>(moment_bytes) / (slow.gbps * 1e9);
  for (int s = 0; s < 3; ++s) {
    const double lr = 1e-2 * (s + 1);
    plain.step(w_plain, grads, lr);
    const auto t0 = clk::now();
    tier.step(w_tier, grads, lr);
    EXPECT_GE(seconds_since(t0), floor_s) << "step " << s;
  }
  // The blocked step is the unblocked kernel over each whole parameter, bit for bit.
  parallel::model_weights w_ref = parallel::model_weights::random_init(c, 3, 0.5f);
  parallel::model_weights m_ref = parallel::model_weights::zeros_like(w_ref);
  parallel::model_weights v_ref = parallel::model_weights::zeros_like(w_ref);
  {
    auto pw = w_ref.parameters(), pm = m_ref.parameters(), pv = v_ref.parameters();
    const auto pg = grads.parameters();
    for (int s = 0; s < 3; ++s)
      for (size_t i = 0; i < pw.size(); ++i) {
        kernels::adamw_params hp;
        hp.lr = static_cast<float>(1e-2 * (s + 1));
        hp.beta1 = 0.9f, hp.beta2 = 0.95f, hp.eps = 1e-8f;
        hp.weight_decay = pw[i].value.ndim() >= 2 ? 0.1f : 0.0f;
        kernels::cpu::adamw_update(pw[i].value.data<float>(), pg[i].second.data<float>(), pm[i].value.data<float>(),
                                   pv[i].value.data<float>(), pw[i].value.numel(), hp, s + 1);
      }
  }
  EXPECT_TRUE(bitwise_equal(w_ref, w_plain));
  EXPECT_TRUE(bitwise_equal(m_ref, plain.exp_avg()));
  EXPECT_TRUE(bitwise_equal(v_ref, plain.exp_avg_sq()));
  EXPECT_TRUE(bitwise_equal(w_plain, w_tier));
  EXPECT_TRUE(bitwise_equal(plain.exp_avg(), tier.exp_avg()));
  EXPECT_TRUE(bitwise_equal(plain.exp_avg_sq(), tier.exp_avg_sq()));
  // And the update did something: the weights left their initial values.
  const parallel::model_weights w0 = parallel::model_weights::random_init(c, 3, 0.5f);
  EXPECT_NE(std::memcmp(w0.embed.data<float>(), w_tier.embed.data<float>(), 64 * sizeof(float)), 0);
}

}  // namespace
