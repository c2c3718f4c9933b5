// Every cuda:: op against its cpu:: twin on random inputs (relative error <= 1e-4,
// top-k indices exact). Skips with runtime::cuda_status()'s reason where no GPU answers;
// the host-side argument checks of the cuda ops run everywhere CUDA is built.
// TROUPE_CUDA_TIMING=1 prints per-op device times (informational only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>

namespace {

using namespace troupe::kernels;
using troupe::runtime::device;
using troupe::runtime::errc;
using troupe::runtime::error;
using troupe::runtime::tensor;

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// A device copy of host values, and back.
template <typename T>
tensor dev(const std::vector<T>& v) {
  return tensor::from_vector(v, {static_cast<int64_t>(v.size())}).to(device::cuda(0));
}
template <typename T>
std::vector<T> host(const tensor& t) {
  tensor h = t.to(device::cpu());
  const T* p = h.data<T>();
  return std::vector<T>(p, p + h.numel());
}
tensor dev_empty(int64_t n, troupe::runtime::dtype dt = troupe::runtime::dtype::f32) {
  return tensor::empty({n}, dt, device::cuda(0));
}
float* fp(const tensor& t) { return t.data<float>(); }
int32_t* ip(const tensor& t) { return t.data<int32_t>(); }

// Norm-wise relative error: max |got - want| / max |want|.
double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return INFINITY;
    num = std::max(num, std::abs(static_cast<double>(got[i]) - want[i]));
    den = std::max(den, std::abs(static_cast<double>(want[i])));
  }
  return den > 0.0 ? num / den : num;
}
constexpr double kTol = 1e-4;

// With TROUPE_CUDA_TIMING=1: runs `launch` a few times on the default stream and prints
// the mean device time. Informational only; nothing asserts on it.
void maybe_time(const std::string& name, const std::function<void()>& launch) {
  const char* env = std::getenv("TROUPE_CUDA_TIMING");
  if (env == nullptr || std::string(env) != "1") return;
  const int reps = 20;
  launch();  // warm-up
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, nullptr);
  for (int i = 0; i < reps; ++i) launch();
  cudaEventRecord(stop, nullptr);
  cudaEventSynchronize(stop);
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::printf("[timing] %-40s %9.4f ms\n", name.c_str(), ms / reps);
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = troupe::runtime::cuda_status();
    if (!s.available) GTEST_SKIP() << "no usable GPU: " << s.reason;
  }
};

TEST_F(CudaOps, Embedding) {
  const int64_t N = 300, C = 96, V = 1000;
  std::vector<int32_t> ids(N);
  std::mt19937 gen(1);
  for (auto& id : ids) id = static_cast<int32_t>(gen() % V);
  auto wte = randn(V * C, 2);
  std::vector<float> want(N * C);
  cpu::embedding_forward(want.data(), ids.data(), wte.data(), N, C, V);
  tensor d_ids = dev(ids), d_wte = dev(wte), d_out = dev_empty(N * C);
  cuda::embedding_forward(fp(d_out), ip(d_ids), fp(d_wte), N, C, V);
  EXPECT_EQ(host<float>(d_out), want);  // a gather is exact
  maybe_time("embedding N=300 C=96", [&] { cuda::embedding_forward(fp(d_out), ip(d_ids), fp(d_wte), N, C, V); });
}

TEST_F(CudaOps, Matmul) {
  const int64_t N = 100, C = 257, OC = 130;
  auto x = randn(N * C, 3), w = randn(OC * C, 4, 0.1f), b = randn(OC, 5);
  tensor d_x = dev(x), d_w = dev(w), d_b = dev(b), d_out = dev_empty(N * OC);
  for (bool with_bias : {true, false}) {
    std::vector<float> want(N * OC);
    cpu::matmul_forward(want.data(), x.data(), w.data(), with_bias ? b.data() : nullptr, N, C, OC);
    cuda::matmul_forward(fp(d_out), fp(d_x), fp(d_w), with_bias ? fp(d_b) : nullptr, N, C, OC);
    EXPECT_LE(rel_err(host<float>(d_out), want), kTol) << "bias=" << with_bias;
  }
  const int64_t M = 512, K = 1024, O = 1024;
  tensor a = dev(randn(M * K, 6)), ww = dev(randn(O * K, 7)), o = dev_empty(M * O);
  maybe_time("matmul 512x1024x1024", [&] { cuda::matmul_forward(fp(o), fp(a), fp(ww), nullptr, M, K, O); });
}

TEST_F(CudaOps, Rmsnorm) {
  const int64_t N = 67, C = 1000;
  auto x = randn(N * C, 8), w = randn(C, 9);
  std::vector<float> want(N * C), want_rstd(N);
  cpu::rmsnorm_forward(want.data(), want_rstd.data(), x.data(), w.data(), N, C, 1e-5f);
  tensor d_x = dev(x), d_w = dev(w), d_out = dev_empty(N * C), d_rstd = dev_empty(N);
  cuda::rmsnorm_forward(fp(d_out), fp(d_rstd), fp(d_x), fp(d_w), N, C, 1e-5f);
  EXPECT_LE(rel_err(host<float>(d_out), want), kTol);
  EXPECT_LE(rel_err(host<float>(d_rstd), want_rstd), kTol);
  cuda::rmsnorm_forward(fp(d_x), nullptr, fp(d_x), fp(d_w), N, C, 1e-5f);  // in place, no rstd
  EXPECT_LE(rel_err(host<float>(d_x), want), kTol);
  maybe_time("rmsnorm N=67 C=1000", [&] { cuda::rmsnorm_forward(fp(d_out), fp(d_rstd), fp(d_out), fp(d_w), N, C, 1e-5f); });
}

TEST_F(CudaOps, Rope) {
  const int64_t B = 2, T = 33, NH = 4, HD = 64;
  for (int64_t rot : {int64_t{64}, int64_t{32}}) {
    auto x = randn(B * T * NH * HD, 10);
    auto cos = randn(T * rot / 2, 11), sin = randn(T * rot / 2, 12);
    std::vector<float> want(x.size());
    cpu::rope_forward(want.data(), x.data(), cos.data(), sin.data(), B, T, NH, HD, rot);
    tensor d_x = dev(x), d_c = dev(cos), d_s = dev(sin), d_out = dev_empty(static_cast<int64_t>(x.size()));
    cuda::rope_forward(fp(d_out), fp(d_x), fp(d_c), fp(d_s), B, T, NH, HD, rot);
    EXPECT_LE(rel_err(host<float>(d_out), want), kTol) << "rotary_dim=" << rot;
    cuda::rope_forward(fp(d_x), fp(d_x), fp(d_c), fp(d_s), B, T, NH, HD, rot);  // in place
    EXPECT_LE(rel_err(host<float>(d_x), want), kTol) << "in place, rotary_dim=" << rot;
  }
}

struct attn_case {
  attention_dims d;
  const char* name;
};

TEST_F(CudaOps, Attention) {
  std::vector<attn_case> cases = {
      {{.B = 2, .Tq = 70, .Tk = 70, .NH = 4, .NKV = 2, .HD = 64}, "GQA T=70 HD=64"},
      {{.B = 1, .Tq = 45, .Tk = 45, .NH = 3, .NKV = 1, .HD = 80, .window = 20}, "MQA window=20 HD=80"},
      {{.B = 2, .Tq = 5, .Tk = 77, .NH = 4, .NKV = 4, .HD = 128, .window = 16, .kv_stride_b = 90 * 4 * 128},
       "decode Tq=5 Tk=77 cache=90 HD=128"},
      {{.B = 1, .Tq = 40, .Tk = 40, .NH = 2, .NKV = 2, .HD = 256, .scale = 0.3f}, "HD=256 scale=0.3"},
      {{.B = 1, .Tq = 1, .Tk = 33, .NH = 8, .NKV = 2, .HD = 32}, "one query HD=32"},
  };
  uint32_t seed = 20;
  for (const auto& c : cases) {
    const auto& d = c.d;
    const int64_t stride = d.kv_stride_b ? d.kv_stride_b : d.Tk * d.NKV * d.HD;
    auto q = randn(d.B * d.Tq * d.NH * d.HD, seed++), k = randn(d.B * stride, seed++), v = randn(d.B * stride, seed++);
    std::vector<float> want(q.size()), want_lse(d.B * d.NH * d.Tq);
    cpu::attention_forward(want.data(), want_lse.data(), q.data(), k.data(), v.data(), d);
    tensor d_q = dev(q), d_k = dev(k), d_v = dev(v), d_out = dev_empty(static_cast<int64_t>(q.size())),
           d_lse = dev_empty(static_cast<int64_t>(want_lse.size()));
    cuda::attention_forward(fp(d_out), fp(d_lse), fp(d_q), fp(d_k), fp(d_v), d);
    EXPECT_LE(rel_err(host<float>(d_out), want), kTol) << c.name;
    EXPECT_LE(rel_err(host<float>(d_lse), want_lse), kTol) << c.name;
    cuda::attention_forward(fp(d_out), nullptr, fp(d_q), fp(d_k), fp(d_v), d);  // lse is nullable
    EXPECT_LE(rel_err(host<float>(d_out), want), kTol) << c.name << " (no lse)";
  }
  attention_dims big{.B = 1, .Tq = 2048, .Tk = 2048, .NH = 16, .NKV = 4, .HD = 128};
  tensor q = dev(randn(2048 * 16 * 128, 90)), kv = dev(randn(2048 * 4 * 128, 91)), o = dev_empty(2048 * 16 * 128);
  maybe_time("attention T=2048 NH=16 NKV=4 HD=128", [&] { cuda::attention_forward(fp(o), nullptr, fp(q), fp(kv), fp(kv), big); });
}

TEST_F(CudaOps, Swiglu) {
  const int64_t N = 100, I = 333;
  auto g = randn(N * I, 30, 4.0f), u = randn(N * I, 31);
  std::vector<float> want(N * I);
  cpu::swiglu_forward(want.data(), g.data(), u.data(), N, I);
  tensor d_g = dev(g), d_u = dev(u), d_out = dev_empty(N * I);
  cuda::swiglu_forward(fp(d_out), fp(d_g), fp(d_u), N, I);
  EXPECT_LE(rel_err(host<float>(d_out), want), kTol);
}

TEST_F(CudaOps, CrossEntropy) {
  const int64_t N = 50, V = 5000;
  auto logits = randn(N * V, 40, 3.0f);
  std::vector<int32_t> targets(N);
  std::mt19937 gen(41);
  for (auto& t : targets) t = static_cast<int32_t>(gen() % V);
  targets[3] = -100;  // ignored
  std::vector<float> want(N);
  cpu::cross_entropy_forward(want.data(), logits.data(), targets.data(), N, V);
  tensor d_l = dev(logits), d_t = dev(targets), d_loss = dev_empty(N);
  cuda::cross_entropy_forward(fp(d_loss), fp(d_l), ip(d_t), N, V);
  auto got = host<float>(d_loss);
  EXPECT_LE(rel_err(got, want), kTol);
  EXPECT_EQ(got[3], 0.0f);
}

TEST_F(CudaOps, Adamw) {
  const int64_t n = 10007;
  adamw_params hp{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  auto p = randn(n, 50), m = std::vector<float>(n, 0.0f), v = std::vector<float>(n, 0.0f);
  tensor d_p = dev(p), d_m = dev(m), d_v = dev(v);
  for (int64_t step = 1; step <= 3; ++step) {
    auto g = randn(n, 51 + static_cast<uint32_t>(step));
    cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, hp, step);
    tensor d_g = dev(g);
    cuda::adamw_update(fp(d_p), fp(d_g), fp(d_m), fp(d_v), n, hp, step);
  }
  EXPECT_LE(rel_err(host<float>(d_p), p), kTol);
  EXPECT_LE(rel_err(host<float>(d_m), m), kTol);
  EXPECT_LE(rel_err(host<float>(d_v), v), kTol);
}

TEST_F(CudaOps, MoeRouter) {
  struct rc { int64_t N, E, K; };
  for (rc c : {rc{257, 64, 8}, rc{100, 8, 2}, rc{33, 40, 1}}) {
    for (bool normalize : {true, false}) {
      auto logits = randn(c.N * c.E, 60 + static_cast<uint32_t>(c.E), 2.0f);
      for (int64_t e = 0; e < c.E; ++e) logits[e] = 0.25f;  // row 0: all tied, lower ids win
      std::vector<float> probs(c.N * c.E), w(c.N * c.K);
      std::vector<int32_t> idx(c.N * c.K);
      cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), c.N, c.E, c.K, normalize);
      tensor d_l = dev(logits), d_p = dev_empty(c.N * c.E), d_w = dev_empty(c.N * c.K),
             d_i = dev_empty(c.N * c.K, troupe::runtime::dtype::i32);
      cuda::moe_router_forward(fp(d_p), ip(d_i), fp(d_w), fp(d_l), c.N, c.E, c.K, normalize);
      EXPECT_EQ(host<int32_t>(d_i), idx) << "E=" << c.E << " K=" << c.K;
      EXPECT_LE(rel_err(host<float>(d_p), probs), kTol);
      EXPECT_LE(rel_err(host<float>(d_w), w), kTol);
    }
  }
}

TEST_F(CudaOps, MoePermuteUnpermute) {
  const int64_t N = 129, E = 16, K = 4, C = 72;
  auto logits = randn(N * E, 70);
  std::vector<float> probs(N * E), w(N * K);
  std::vector<int32_t> idx(N * K), off(E + 1), row_slot(N * K), slot_row(N * K);
  cpu::moe_router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, true);
  cpu::moe_permute_plan(off.data(), row_slot.data(), slot_row.data(), idx.data(), N, E, K);
  auto x = randn(N * C, 71), yp = randn(N * K * C, 72);
  std::vector<float> want_xp(N * K * C), want_out(N * C);
  cpu::moe_permute(want_xp.data(), x.data(), slot_row.data(), N * K, K, C);
  cpu::moe_unpermute(want_out.data(), yp.data(), w.data(), row_slot.data(), N, K, C);
  tensor d_x = dev(x), d_sr = dev(slot_row), d_rs = dev(row_slot), d_w = dev(w), d_yp = dev(yp),
         d_xp = dev_empty(N * K * C), d_out = dev_empty(N * C);
  cuda::moe_permute(fp(d_xp), fp(d_x), ip(d_sr), N * K, K, C);
  cuda::moe_unpermute(fp(d_out), fp(d_yp), fp(d_w), ip(d_rs), N, K, C);
  EXPECT_EQ(host<float>(d_xp), want_xp);  // a gather is exact
  EXPECT_LE(rel_err(host<float>(d_out), want_out), kTol);
}

// The host-side checks run before any device work, so they are tested without a GPU.
TEST(CudaOpsArgs, RejectBadArgumentsBeforeTouchingTheDevice) {
  auto code_of = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const error& e) {
      return e.code();
    }
    return errc::internal;
  };
  EXPECT_EQ(code_of([] { cuda::moe_router_forward(nullptr, nullptr, nullptr, nullptr, 4, 16, 9, true); }),
            errc::unsupported);
  EXPECT_EQ(code_of([] { cuda::moe_router_forward(nullptr, nullptr, nullptr, nullptr, 4, 4, 5, true); }),
            errc::invalid_argument);
  EXPECT_EQ(code_of([] {
              cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                      attention_dims{.B = 1, .Tq = 4, .Tk = 4, .NH = 3, .NKV = 2, .HD = 16});
            }),
            errc::invalid_argument);
  EXPECT_EQ(code_of([] {
              cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                      attention_dims{.B = 1, .Tq = 4, .Tk = 4, .NH = 2, .NKV = 2, .HD = 512});
            }),
            errc::unsupported);
  EXPECT_EQ(code_of([] {
              cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                      attention_dims{.B = 1, .Tq = 8, .Tk = 4, .NH = 2, .NKV = 2, .HD = 16});
            }),
            errc::invalid_argument);
  EXPECT_EQ(code_of([] { cuda::rope_forward(nullptr, nullptr, nullptr, nullptr, 1, 1, 1, 64, 33); }),
            errc::invalid_argument);
  EXPECT_EQ(code_of([] { cuda::adamw_update(nullptr, nullptr, nullptr, nullptr, 4, adamw_params{}, 0); }),
            errc::invalid_argument);
  EXPECT_EQ(code_of([] { cuda::matmul_forward(nullptr, nullptr, nullptr, nullptr, -1, 4, 4); }),
            errc::invalid_argument);
}

}  // namespace

#else  // !TROUPE_HAVE_CUDA

TEST(CudaOps, NotBuilt) { GTEST_SKIP() << troupe::runtime::cuda_status().reason; }

#endif
