// kernels/dispatch_moe.cpp — tensor-level MoE ops: check, then cpu:: or cuda:: by device.
#include "kernels/dispatch.h"
#include "kernels/dispatch_check.h"
#include "kernels/moe.h"

namespace troupe::kernels {

using namespace dispatch_detail;

namespace {
// (N, K) routing tensors: returns {N, K}.
std::pair<int64_t, int64_t> check_routing(const char* op, const char* name, const tensor& t, dtype dt) {
  check_arg(op, name, t, dt);
  check_ndim(op, name, t, 2);
  return {t.size(0), t.size(1)};
}

// Expert weights: E tensors (rows, cols) each, f32, contiguous, on `dev`.
template <typename Ptr>
std::vector<Ptr> expert_ptrs(const char* op, const char* name, const std::vector<tensor>& ws, size_t E, int64_t rows,
                             int64_t cols, device dev) {
  TROUPE_CHECK(ws.size() == E, errc::invalid_argument, "{}: '{}' has {} tensors but there are {} experts", op, name,
               ws.size(), E);
  std::vector<Ptr> ptrs(E);
  for (size_t e = 0; e < E; ++e) {
    const std::string arg = fmt::format("{}[{}]", name, e);
    check_arg(op, arg.c_str(), ws[e], f32);
    check_shape(op, arg.c_str(), ws[e], {rows, cols});
    TROUPE_CHECK(ws[e].device() == dev, errc::invalid_argument, "{}: '{}' is {} but the activations are on {}", op,
                 arg, ws[e].describe(), dev.str());
    ptrs[e] = fp(ws[e]);
  }
  return ptrs;
}

// expert_offsets: (E + 1) i32 on the cpu, non-decreasing from 0; returns R = offsets[E].
int64_t check_offsets(const char* op, const tensor& off) {
  check_arg(op, "expert_offsets", off, i32);
  check_ndim(op, "expert_offsets", off, 1);
  TROUPE_CHECK(off.device().is_cpu() && off.numel() >= 2, errc::invalid_argument,
               "{}: expert_offsets ({}) must be a cpu tensor of E + 1 >= 2 entries (from moe_permute_plan)", op,
               off.describe());
  const int32_t* o = off.data<int32_t>();
  TROUPE_CHECK(o[0] == 0, errc::invalid_argument, "{}: expert_offsets[0] is {} but must be 0", op, o[0]);
  for (int64_t e = 0; e + 1 < off.numel(); ++e)
    TROUPE_CHECK(o[e] <= o[e + 1], errc::invalid_argument, "{}: expert_offsets must be non-decreasing, [{}]={} > [{}]={}",
                 op, e, o[e], e + 1, o[e + 1]);
  return o[off.numel() - 1];
}
}  // namespace

void moe_router_forward(tensor& probs, tensor& topk_idx, tensor& topk_w, const tensor& logits, bool normalize,
                        void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "moe_router_forward";
  const auto [N, E] = check_routing(op, "logits", logits, f32);
  const auto [Ni, K] = check_routing(op, "topk_idx", topk_idx, i32);
  check_arg(op, "probs", probs, f32);
  check_shape(op, "probs", probs, {N, E}, "(as logits)");
  check_arg(op, "topk_w", topk_w, f32);
  check_shape(op, "topk_idx", topk_idx, {N, K}, fmt::format("(N, K), logits is {}", logits.describe()));
  check_shape(op, "topk_w", topk_w, {N, K}, "(as topk_idx)");
  (void)Ni;
  const device dev =
      common_device(op, {{"probs", &probs}, {"topk_idx", &topk_idx}, {"topk_w", &topk_w}, {"logits", &logits}});
  if (dev.is_cpu()) return cpu::moe_router_forward(fp(probs), ip(topk_idx), fp(topk_w), fp(logits), N, E, K, normalize);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::moe_router_forward(fp(probs), ip(topk_idx), fp(topk_w), fp(logits), N, E, K, normalize, stream);
#endif
}

void moe_permute_plan(tensor& expert_offsets, tensor& row_slot, tensor& slot_row, const tensor& topk_idx) {
  const char* op = "moe_permute_plan";
  const auto [N, K] = check_routing(op, "topk_idx", topk_idx, i32);
  check_arg(op, "expert_offsets", expert_offsets, i32);
  check_ndim(op, "expert_offsets", expert_offsets, 1);
  const int64_t E = expert_offsets.numel() - 1;
  TROUPE_CHECK(E >= 1, errc::invalid_argument, "{}: expert_offsets ({}) needs E + 1 >= 2 entries", op,
               expert_offsets.describe());
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"row_slot", &row_slot}, {"slot_row", &slot_row}}) {
    check_arg(op, name, *t, i32);
    check_shape(op, name, *t, {N * K}, "(N*K)");
  }
  require_cpu(op, common_device(op, {{"expert_offsets", &expert_offsets}, {"row_slot", &row_slot},
                                     {"slot_row", &slot_row}, {"topk_idx", &topk_idx}}));
  cpu::moe_permute_plan(ip(expert_offsets), ip(row_slot), ip(slot_row), ip(topk_idx), N, E, K);
}

void moe_permute(tensor& xp, const tensor& x, const tensor& slot_row, int64_t K, void* stream) {
  (void)stream;
  const char* op = "moe_permute";
  check_arg(op, "x", x, f32);
  check_arg(op, "slot_row", slot_row, i32);
  check_arg(op, "xp", xp, f32);
  check_ndim(op, "x", x, 2);
  TROUPE_CHECK(K >= 1, errc::invalid_argument, "{}: K={} must be >= 1", op, K);
  const int64_t N = x.size(0), C = x.size(1);
  check_shape(op, "slot_row", slot_row, {N * K}, fmt::format("(N*K) with K={}, x is {}", K, x.describe()));
  check_shape(op, "xp", xp, {N * K, C}, "(N*K, C)");
  const device dev = common_device(op, {{"xp", &xp}, {"x", &x}, {"slot_row", &slot_row}});
  if (dev.is_cpu()) return cpu::moe_permute(fp(xp), fp(x), ip(slot_row), N * K, K, C);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::moe_permute(fp(xp), fp(x), ip(slot_row), N * K, K, C, stream);
#endif
}

void moe_unpermute(tensor& out, const tensor& yp, const tensor& topk_w, const tensor& row_slot, void* stream) {
  (void)stream;
  const char* op = "moe_unpermute";
  const auto [N, K] = check_routing(op, "topk_w", topk_w, f32);
  check_arg(op, "yp", yp, f32);
  check_arg(op, "row_slot", row_slot, i32);
  check_arg(op, "out", out, f32);
  check_ndim(op, "yp", yp, 2);
  const int64_t C = yp.size(1);
  check_shape(op, "yp", yp, {N * K, C}, fmt::format("(N*K, C), topk_w is {}", topk_w.describe()));
  check_shape(op, "row_slot", row_slot, {N * K}, "(N*K)");
  check_shape(op, "out", out, {N, C}, "(N, C)");
  const device dev = common_device(op, {{"out", &out}, {"yp", &yp}, {"topk_w", &topk_w}, {"row_slot", &row_slot}});
  if (dev.is_cpu()) return cpu::moe_unpermute(fp(out), fp(yp), fp(topk_w), ip(row_slot), N, K, C);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::moe_unpermute(fp(out), fp(yp), fp(topk_w), ip(row_slot), N, K, C, stream);
#endif
}

namespace {
struct ffn_dims {
  int64_t R;  // permuted rows
  size_t E;   // experts
  int64_t C;  // hidden
  int64_t I;  // expert width
};
// The checks both expert-FFN directions share: offsets, xp (R, C), and I from w_gate[0].
ffn_dims check_ffn_input(const char* op, const tensor& xp, const std::vector<tensor>& w_gate,
                         const tensor& expert_offsets) {
  const int64_t R = check_offsets(op, expert_offsets);
  const size_t E = static_cast<size_t>(expert_offsets.numel() - 1);
  check_arg(op, "xp", xp, f32);
  check_ndim(op, "xp", xp, 2);
  const int64_t C = xp.size(1);
  check_shape(op, "xp", xp, {R, C}, fmt::format("(R, C) with R = expert_offsets[E] = {}", R));
  TROUPE_CHECK(!w_gate.empty() && w_gate[0].defined() && w_gate[0].ndim() == 2, errc::invalid_argument,
               "{}: w_gate must hold E 2-d (I, C) tensors", op);
  return {R, E, C, w_gate[0].size(0)};
}
}  // namespace

void moe_expert_ffn_forward(tensor& yp, tensor& h_gate, tensor& h_up, const tensor& xp,
                            const std::vector<tensor>& w_gate, const std::vector<tensor>& w_up,
                            const std::vector<tensor>& w_down, const tensor& expert_offsets) {
  const char* op = "moe_expert_ffn_forward";
  const auto [R, E, C, I] = check_ffn_input(op, xp, w_gate, expert_offsets);
  check_arg(op, "yp", yp, f32);
  check_shape(op, "yp", yp, {R, C}, "(as xp)");
  check_arg(op, "h_gate", h_gate, f32);
  check_shape(op, "h_gate", h_gate, {R, I}, "(R, I)");
  check_arg(op, "h_up", h_up, f32);
  check_shape(op, "h_up", h_up, {R, I}, "(R, I)");
  const device dev = common_device(op, {{"yp", &yp}, {"h_gate", &h_gate}, {"h_up", &h_up}, {"xp", &xp}});
  require_cpu("the MoE expert FFN", dev);
  auto g = expert_ptrs<const float*>(op, "w_gate", w_gate, E, I, C, dev);
  auto u = expert_ptrs<const float*>(op, "w_up", w_up, E, I, C, dev);
  auto d = expert_ptrs<const float*>(op, "w_down", w_down, E, C, I, dev);
  cpu::moe_expert_ffn_forward(fp(yp), fp(h_gate), fp(h_up), fp(xp), g.data(), u.data(), d.data(),
                              expert_offsets.data<int32_t>(), static_cast<int64_t>(E), C, I);
}

// ---- backward (cpu only) ----------------------------------------------------------------

void moe_router_backward(tensor& dlogits, const tensor& dtopk_w, const tensor& probs, const tensor& topk_idx,
                         const tensor& topk_w, bool normalize) {
  const char* op = "moe_router_backward";
  const auto [N, E] = check_routing(op, "probs", probs, f32);
  const auto [Nk, K] = check_routing(op, "topk_idx", topk_idx, i32);
  (void)Nk;
  check_shape(op, "topk_idx", topk_idx, {N, K}, fmt::format("(N, K), probs is {}", probs.describe()));
  for (auto [name, t, want] : {std::tuple<const char*, const tensor*, runtime::shape_t>{"dlogits", &dlogits, {N, E}},
                               {"dtopk_w", &dtopk_w, {N, K}}, {"topk_w", &topk_w, {N, K}}}) {
    check_arg(op, name, *t, f32);
    check_shape(op, name, *t, want);
  }
  require_cpu("backward of the MoE router",
              common_device(op, {{"dlogits", &dlogits}, {"dtopk_w", &dtopk_w}, {"probs", &probs},
                                 {"topk_idx", &topk_idx}, {"topk_w", &topk_w}}));
  cpu::moe_router_backward(fp(dlogits), fp(dtopk_w), fp(probs), ip(topk_idx), fp(topk_w), N, E, K, normalize);
}

void moe_permute_backward(tensor& dx, const tensor& dxp, const tensor& row_slot) {
  const char* op = "moe_permute_backward";
  check_arg(op, "dx", dx, f32);
  check_arg(op, "dxp", dxp, f32);
  check_arg(op, "row_slot", row_slot, i32);
  check_ndim(op, "dx", dx, 2);
  const int64_t N = dx.size(0), C = dx.size(1);
  TROUPE_CHECK(N > 0 && row_slot.numel() % N == 0, errc::invalid_argument,
               "{}: row_slot ({}) must hold N*K entries for dx {}", op, row_slot.describe(), dx.describe());
  const int64_t K = row_slot.numel() / N;
  check_shape(op, "row_slot", row_slot, {N * K}, "(N*K)");
  check_shape(op, "dxp", dxp, {N * K, C}, "(N*K, C)");
  require_cpu("backward of moe_permute",
              common_device(op, {{"dx", &dx}, {"dxp", &dxp}, {"row_slot", &row_slot}}));
  cpu::moe_permute_backward(fp(dx), fp(dxp), ip(row_slot), N, K, C);
}

void moe_unpermute_backward(tensor& dyp, tensor& dtopk_w, const tensor& dout, const tensor& yp, const tensor& topk_w,
                            const tensor& row_slot) {
  const char* op = "moe_unpermute_backward";
  const auto [N, K] = check_routing(op, "topk_w", topk_w, f32);
  check_arg(op, "dout", dout, f32);
  check_ndim(op, "dout", dout, 2);
  const int64_t C = dout.size(1);
  check_shape(op, "dout", dout, {N, C}, fmt::format("(N, C), topk_w is {}", topk_w.describe()));
  for (auto [name, t, want] :
       {std::tuple<const char*, const tensor*, runtime::shape_t>{"dyp", &dyp, {N * K, C}}, {"yp", &yp, {N * K, C}},
        {"dtopk_w", &dtopk_w, {N, K}}}) {
    check_arg(op, name, *t, f32);
    check_shape(op, name, *t, want);
  }
  check_arg(op, "row_slot", row_slot, i32);
  check_shape(op, "row_slot", row_slot, {N * K}, "(N*K)");
  require_cpu("backward of moe_unpermute",
              common_device(op, {{"dyp", &dyp}, {"dtopk_w", &dtopk_w}, {"dout", &dout}, {"yp", &yp},
                                 {"topk_w", &topk_w}, {"row_slot", &row_slot}}));
  cpu::moe_unpermute_backward(fp(dyp), fp(dtopk_w), fp(dout), fp(yp), fp(topk_w), ip(row_slot), N, K, C);
}

void moe_expert_ffn_backward(tensor& dxp, std::vector<tensor>& dw_gate, std::vector<tensor>& dw_up,
                             std::vector<tensor>& dw_down, const tensor& dyp, const tensor& xp, const tensor& h_gate,
                             const tensor& h_up, const std::vector<tensor>& w_gate, const std::vector<tensor>& w_up,
                             const std::vector<tensor>& w_down, const tensor& expert_offsets) {
  const char* op = "moe_expert_ffn_backward";
  const auto [R, E, C, I] = check_ffn_input(op, xp, w_gate, expert_offsets);
  for (auto [name, t, want] : {std::tuple<const char*, const tensor*, runtime::shape_t>{"dxp", &dxp, {R, C}},
                               {"dyp", &dyp, {R, C}}, {"h_gate", &h_gate, {R, I}}, {"h_up", &h_up, {R, I}}}) {
    check_arg(op, name, *t, f32);
    check_shape(op, name, *t, want);
  }
  const device dev =
      common_device(op, {{"dxp", &dxp}, {"dyp", &dyp}, {"xp", &xp}, {"h_gate", &h_gate}, {"h_up", &h_up}});
  require_cpu("backward of the MoE expert FFN", dev);
  auto g = expert_ptrs<const float*>(op, "w_gate", w_gate, E, I, C, dev);
  auto u = expert_ptrs<const float*>(op, "w_up", w_up, E, I, C, dev);
  auto d = expert_ptrs<const float*>(op, "w_down", w_down, E, C, I, dev);
  auto dg = expert_ptrs<float*>(op, "dw_gate", dw_gate, E, I, C, dev);
  auto du = expert_ptrs<float*>(op, "dw_up", dw_up, E, I, C, dev);
  auto dd = expert_ptrs<float*>(op, "dw_down", dw_down, E, C, I, dev);
  cpu::moe_expert_ffn_backward(fp(dxp), dg.data(), du.data(), dd.data(), fp(dyp), fp(xp), fp(h_gate), fp(h_up),
                               g.data(), u.data(), d.data(), expert_offsets.data<int32_t>(), static_cast<int64_t>(E),
                               C, I);
}

}  // namespace troupe::kernels
