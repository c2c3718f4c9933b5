// kernels/dispatch: tensor-level calls equal the raw cpu calls; dtype, shape, contiguity
// and device errors name the op and the argument; backward on cuda is refused.
#include "kernels/dispatch.h"

#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"

namespace {

namespace k = troupe::kernels;
using troupe::runtime::device;
using troupe::runtime::dtype;
using troupe::runtime::errc;
using troupe::runtime::error;
using troupe::runtime::shape_t;
using troupe::runtime::tensor;

tensor randn(const shape_t& shape, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  tensor t = tensor::empty(shape);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = d(gen);
  return t;
}
std::vector<float> values(const tensor& t) {
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

// Runs f, expects an error with `code` whose message contains every needle.
void expect_error(const std::function<void()>& f, errc code, std::vector<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' in: " << e.what();
  }
}

// A tensor that claims to live on cuda:0 (host memory, never dereferenced): lets the
// device checks run without a GPU.
tensor fake_cuda(std::vector<float>& host_buf, const shape_t& shape) {
  return tensor::from_blob(host_buf.data(), shape, dtype::f32, device::cuda(0));
}

TEST(Dispatch, DenseForwardEqualsRawCpu) {
  const int64_t B = 2, T = 3, C = 16, OC = 6;
  tensor x = randn({B, T, C}, 1), w = randn({C}, 2), out = tensor::empty({B, T, C}), rstd = tensor::empty({B, T});
  k::rmsnorm_forward(out, &rstd, x, w, 1e-5f);
  std::vector<float> ro(B * T * C), rr(B * T);
  k::cpu::rmsnorm_forward(ro.data(), rr.data(), x.data<float>(), w.data<float>(), B * T, C, 1e-5f);
  EXPECT_EQ(values(out), ro);
  EXPECT_EQ(values(rstd), rr);

  tensor W = randn({OC, C}, 3), bias = randn({OC}, 4), y = tensor::empty({B, T, OC});
  k::matmul_forward(y, x, W, &bias);
  std::vector<float> ry(B * T * OC);
  k::cpu::matmul_forward(ry.data(), x.data<float>(), W.data<float>(), bias.data<float>(), B * T, C, OC);
  EXPECT_EQ(values(y), ry);

  tensor gate = randn({B, T, C}, 5), up = randn({B, T, C}, 6), s = tensor::empty({B, T, C});
  k::swiglu_forward(s, gate, up);
  std::vector<float> rs(B * T * C);
  k::cpu::swiglu_forward(rs.data(), gate.data<float>(), up.data<float>(), B * T, C);
  EXPECT_EQ(values(s), rs);

  const int64_t V = 11;
  tensor ids = tensor::from_vector<int32_t>({1, 0, 10, 3, 3, 7}, {B, T}), wte = randn({V, C}, 7),
         emb = tensor::empty({B, T, C});
  k::embedding_forward(emb, ids, wte);
  std::vector<float> re(B * T * C);
  k::cpu::embedding_forward(re.data(), ids.data<int32_t>(), wte.data<float>(), B * T, C, V);
  EXPECT_EQ(values(emb), re);

  tensor logits = randn({B, T, V}, 8), targets = tensor::from_vector<int32_t>({1, -100, 10, 0, 5, 2}, {B, T}),
         losses = tensor::empty({B, T});
  k::cross_entropy_forward(losses, logits, targets);
  std::vector<float> rl(B * T);
  k::cpu::cross_entropy_forward(rl.data(), logits.data<float>(), targets.data<int32_t>(), B * T, V);
  EXPECT_EQ(values(losses), rl);

  const int64_t NH = 2, HD = 8;
  tensor qr = randn({B, T, NH, HD}, 9), cos = randn({T, 2}, 10), sin = randn({T, 2}, 11), qo = tensor::empty({B, T, NH, HD});
  k::rope_forward(qo, qr, cos, sin);  // partial rotary: rotary_dim = 2 * cos.size(1) = 4
  std::vector<float> rq(B * T * NH * HD);
  k::cpu::rope_forward(rq.data(), qr.data<float>(), cos.data<float>(), sin.data<float>(), B, T, NH, HD, 4);
  EXPECT_EQ(values(qo), rq);
}

TEST(Dispatch, AttentionOnAKvCacheSliceEqualsContiguousKv) {
  const int64_t B = 2, Tq = 3, Tk = 7, cap = 10, NH = 4, NKV = 2, HD = 8;
  tensor q = randn({B, Tq, NH, HD}, 20), kc = randn({B, cap, NKV, HD}, 21), vc = randn({B, cap, NKV, HD}, 22);
  tensor kslice = kc.slice(1, 0, Tk), vslice = vc.slice(1, 0, Tk);
  ASSERT_FALSE(kslice.is_contiguous());
  tensor out = tensor::empty({B, Tq, NH, HD}), lse = tensor::empty({B, NH, Tq});
  k::attention_forward(out, &lse, q, kslice, vslice, {.window = 5});
  // Raw call with the cache's batch stride.
  k::attention_dims d{.B = B, .Tq = Tq, .Tk = Tk, .NH = NH, .NKV = NKV, .HD = HD, .window = 5,
                      .kv_stride_b = cap * NKV * HD};
  std::vector<float> ro(out.numel()), rl(lse.numel());
  k::cpu::attention_forward(ro.data(), rl.data(), q.data<float>(), kc.data<float>(), vc.data<float>(), d);
  EXPECT_EQ(values(out), ro);
  EXPECT_EQ(values(lse), rl);
  // The same numbers from contiguous copies of k and v.
  tensor out2 = tensor::empty({B, Tq, NH, HD});
  k::attention_forward(out2, nullptr, q, kslice.contiguous(), vslice.contiguous(), {.window = 5});
  auto a = values(out), b = values(out2);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-6f) << i;
}

TEST(Dispatch, BackwardEqualsRawCpu) {
  const int64_t N = 5, C = 12, OC = 7;
  tensor x = randn({N, C}, 30), w = randn({C}, 31), rstd = tensor::empty({N}), out = tensor::empty({N, C});
  k::rmsnorm_forward(out, &rstd, x, w, 1e-6f);
  tensor dout = randn({N, C}, 32), dx = tensor::empty({N, C}), dw = tensor::zeros({C});
  k::rmsnorm_backward(dx, &dw, dout, x, w, rstd);
  std::vector<float> rdx(N * C), rdw(C, 0.0f);
  k::cpu::rmsnorm_backward(rdx.data(), rdw.data(), dout.data<float>(), x.data<float>(), w.data<float>(),
                           rstd.data<float>(), N, C);
  EXPECT_EQ(values(dx), rdx);
  EXPECT_EQ(values(dw), rdw);

  tensor W = randn({OC, C}, 33), dy = randn({N, OC}, 34), dinp = tensor::empty({N, C}), dW = tensor::zeros({OC, C});
  k::matmul_backward(&dinp, &dW, nullptr, dy, x, W);
  std::vector<float> rdi(N * C), rdW(OC * C, 0.0f);
  k::cpu::matmul_backward(rdi.data(), rdW.data(), nullptr, dy.data<float>(), x.data<float>(), W.data<float>(), N, C,
                          OC);
  EXPECT_EQ(values(dinp), rdi);
  EXPECT_EQ(values(dW), rdW);
}

TEST(Dispatch, MoePipelineEqualsRawCpu) {
  const int64_t N = 9, E = 4, K = 2, C = 6, I = 5;
  tensor logits = randn({N, E}, 40), x = randn({N, C}, 41);
  tensor probs = tensor::empty({N, E}), idx = tensor::empty({N, K}, dtype::i32), tw = tensor::empty({N, K});
  k::moe_router_forward(probs, idx, tw, logits, true);
  tensor off = tensor::empty({E + 1}, dtype::i32), row_slot = tensor::empty({N * K}, dtype::i32),
         slot_row = tensor::empty({N * K}, dtype::i32);
  k::moe_permute_plan(off, row_slot, slot_row, idx);
  tensor xp = tensor::empty({N * K, C});
  k::moe_permute(xp, x, slot_row, K);
  std::vector<tensor> wg, wu, wd;
  std::vector<const float*> pg, pu, pd;
  for (int64_t e = 0; e < E; ++e) {
    wg.push_back(randn({I, C}, 50 + e, 0.3f));
    wu.push_back(randn({I, C}, 60 + e, 0.3f));
    wd.push_back(randn({C, I}, 70 + e, 0.3f));
    pg.push_back(wg.back().data<float>());
    pu.push_back(wu.back().data<float>());
    pd.push_back(wd.back().data<float>());
  }
  tensor yp = tensor::empty({N * K, C}), hg = tensor::empty({N * K, I}), hu = tensor::empty({N * K, I});
  k::moe_expert_ffn_forward(yp, hg, hu, xp, wg, wu, wd, off);
  tensor out = tensor::empty({N, C});
  k::moe_unpermute(out, yp, tw, row_slot);

  // The same pipeline through the raw cpu API.
  std::vector<float> rp(N * E), rw(N * K), rxp(N * K * C), ryp(N * K * C), rhg(N * K * I), rhu(N * K * I), ro(N * C);
  std::vector<int32_t> ri(N * K), roff(E + 1), rrs(N * K), rsr(N * K);
  k::cpu::moe_router_forward(rp.data(), ri.data(), rw.data(), logits.data<float>(), N, E, K, true);
  k::cpu::moe_permute_plan(roff.data(), rrs.data(), rsr.data(), ri.data(), N, E, K);
  k::cpu::moe_permute(rxp.data(), x.data<float>(), rsr.data(), N * K, K, C);
  k::cpu::moe_expert_ffn_forward(ryp.data(), rhg.data(), rhu.data(), rxp.data(), pg.data(), pu.data(), pd.data(),
                                 roff.data(), E, C, I);
  k::cpu::moe_unpermute(ro.data(), ryp.data(), rw.data(), rrs.data(), N, K, C);
  EXPECT_EQ(values(out), ro);
  const int32_t* ti = idx.data<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(ti, ti + N * K), ri);

  // Backward pieces run and equal the raw calls.
  tensor dout = randn({N, C}, 80), dyp = tensor::empty({N * K, C}), dtw = tensor::empty({N, K});
  k::moe_unpermute_backward(dyp, dtw, dout, yp, tw, row_slot);
  std::vector<float> rdyp(N * K * C), rdtw(N * K);
  k::cpu::moe_unpermute_backward(rdyp.data(), rdtw.data(), dout.data<float>(), ryp.data(), rw.data(), rrs.data(), N,
                                 K, C);
  EXPECT_EQ(values(dyp), rdyp);
  EXPECT_EQ(values(dtw), rdtw);
  tensor dlogits = tensor::empty({N, E});
  k::moe_router_backward(dlogits, dtw, probs, idx, tw, true);
  std::vector<float> rdl(N * E);
  k::cpu::moe_router_backward(rdl.data(), rdtw.data(), rp.data(), ri.data(), rw.data(), N, E, K, true);
  EXPECT_EQ(values(dlogits), rdl);
}

TEST(DispatchErrors, DtypeShapeContiguityAndNdimNameTheArgument) {
  tensor x = randn({4, 16}, 1), w = randn({16}, 2), out = tensor::empty({4, 16});
  tensor xi = tensor::zeros({4, 16}, dtype::i32);
  expect_error([&] { k::rmsnorm_forward(out, nullptr, xi, w, 1e-5f); }, errc::invalid_argument,
               {"rmsnorm_forward", "'x'", "i32", "must be f32"});
  tensor w15 = randn({15}, 3);
  expect_error([&] { k::rmsnorm_forward(out, nullptr, x, w15, 1e-5f); }, errc::invalid_argument,
               {"rmsnorm_forward", "'w'", "[15]", "[16]"});
  tensor rstd_bad = tensor::empty({5});
  expect_error([&] { k::rmsnorm_forward(out, &rstd_bad, x, w, 1e-5f); }, errc::invalid_argument,
               {"'rstd'", "[5]", "[4]"});
  tensor big = randn({4, 32}, 4);
  tensor strided = big.slice(1, 0, 16);
  expect_error([&] { k::rmsnorm_forward(out, nullptr, strided, w, 1e-5f); }, errc::invalid_argument,
               {"'x'", "contiguous"});
  tensor W = randn({6, 15}, 5), y = tensor::empty({4, 6});
  expect_error([&] { k::matmul_forward(y, x, W, nullptr); }, errc::invalid_argument,
               {"matmul_forward", "'weight'", "[6, 15]", "[6, 16]"});
  tensor r3 = randn({2, 3, 8}, 6), cs = randn({3, 4}, 7);
  expect_error([&] { k::rope_forward(r3, r3, cs, cs); }, errc::invalid_argument, {"rope_forward", "'inp'", "4 dimensions"});
  tensor q = randn({1, 5, 4, 8}, 8), kv = randn({1, 3, 2, 8}, 9), o = tensor::empty({1, 5, 4, 8});
  expect_error([&] { k::attention_forward(o, nullptr, q, kv, kv); }, errc::invalid_argument, {"Tq=5", "Tk=3"});
  tensor q3 = randn({1, 3, 3, 8}, 10), o3 = tensor::empty({1, 3, 3, 8});
  expect_error([&] { k::attention_forward(o3, nullptr, q3, kv, kv); }, errc::invalid_argument, {"multiple"});
}

TEST(DispatchErrors, IdsAndExpertsAreChecked) {
  tensor wte = randn({5, 4}, 1), out = tensor::empty({3, 4});
  tensor ids = tensor::from_vector<int32_t>({0, 5, 1}, {3});
  expect_error([&] { k::embedding_forward(out, ids, wte); }, errc::out_of_range, {"5"});
  tensor logits = randn({3, 4}, 2), probs = tensor::empty({3, 4}), idx = tensor::empty({3, 2}, dtype::i32),
         tw = tensor::empty({3, 3});
  expect_error([&] { k::moe_router_forward(probs, idx, tw, logits, true); }, errc::invalid_argument,
               {"moe_router_forward", "'topk_w'", "[3, 3]", "[3, 2]"});
  tensor off = tensor::from_vector<int32_t>({0, 2, 4}, {3}), xp = randn({4, 6}, 3), yp = tensor::empty({4, 6}),
         h = tensor::empty({4, 5});
  std::vector<tensor> wg = {randn({5, 6}, 4), randn({5, 6}, 5)}, wd = {randn({6, 5}, 6)};
  expect_error([&] { k::moe_expert_ffn_forward(yp, h, h, xp, wg, wg, wd, off); }, errc::invalid_argument,
               {"'w_down'", "1 tensors", "2 experts"});
  std::vector<tensor> wd_bad = {randn({6, 5}, 6), randn({5, 6}, 7)};
  expect_error([&] { k::moe_expert_ffn_forward(yp, h, h, xp, wg, wg, wd_bad, off); }, errc::invalid_argument,
               {"'w_down[1]'", "[5, 6]", "[6, 5]"});
  tensor bad_off = tensor::from_vector<int32_t>({0, 3, 2}, {3});
  expect_error([&] { k::moe_expert_ffn_forward(yp, h, h, xp, wg, wg, wg, bad_off); }, errc::invalid_argument,
               {"non-decreasing"});
}

TEST(DispatchErrors, DevicesMustMatchAndBackwardIsCpuOnly) {
  std::vector<float> b1(64), b2(16), b3(64), b4(4);
  tensor x_cuda = fake_cuda(b1, {4, 16}), w_cuda = fake_cuda(b2, {16}), out_cuda = fake_cuda(b3, {4, 16}),
         rstd_cuda = fake_cuda(b4, {4});
  tensor x = randn({4, 16}, 1), out = tensor::empty({4, 16});
  expect_error([&] { k::rmsnorm_forward(out, nullptr, x, w_cuda, 1e-5f); }, errc::invalid_argument,
               {"rmsnorm_forward", "one device", "'w'", "cuda:0"});
  // All on cuda: backward is refused before any device work.
  tensor dx_cuda = fake_cuda(b1, {4, 16});
#ifdef TROUPE_HAVE_CUDA
  expect_error([&] { k::rmsnorm_backward(dx_cuda, nullptr, out_cuda, x_cuda, w_cuda, rstd_cuda); },
               errc::unsupported, {"backward of rmsnorm", "cpu only"});
#else
  expect_error([&] { k::rmsnorm_backward(dx_cuda, nullptr, out_cuda, x_cuda, w_cuda, rstd_cuda); },
               errc::unsupported, {"no CUDA"});
  expect_error([&] { k::rmsnorm_forward(out_cuda, nullptr, x_cuda, w_cuda, 1e-5f); }, errc::unsupported,
               {"no CUDA"});
#endif
}

}  // namespace
