// kernels/dispatch.cpp — tensor-level dense ops: check, then cpu:: or cuda:: by device.
// (The MoE ops are in kernels/dispatch_moe.cpp.)
#include "kernels/dispatch.h"

#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/dispatch_check.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"

namespace troupe::kernels {

using namespace dispatch_detail;

namespace {

#ifdef TROUPE_HAVE_CUDA
// Ids/targets of a cuda op are range-checked on the host (the device cannot throw).
void check_ids_on_host(const char* op, const char* name, const tensor& ids, int64_t V, bool allow_negative,
                       void* stream) {
  const std::vector<int32_t> h = i32_to_host(ids, stream);
  for (size_t i = 0; i < h.size(); ++i) {
    const bool ok = h[i] < V && (h[i] >= 0 || allow_negative);
    TROUPE_CHECK(ok, errc::out_of_range, "{}: '{}' holds {} at position {}, outside [{}, {})", op, name, h[i], i,
                 allow_negative ? "<0 ignored, 0" : "0", V);
  }
}
#endif

// k, v: (B, Tk, NKV, HD), contiguous inside a batch; returns their batch stride.
int64_t check_kv(const char* op, const tensor& k, const tensor& v, const tensor& q) {
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"k", &k}, {"v", &v}}) {
    TROUPE_CHECK(t->defined() && t->dtype() == f32, errc::invalid_argument, "{}: argument '{}' must be a defined f32 tensor",
                 op, name);
    check_ndim(op, name, *t, 4);
  }
  check_shape(op, "v", v, k.shape(), "(as k)");
  const int64_t B = k.size(0), Tk = k.size(1), NKV = k.size(2), HD = k.size(3);
  TROUPE_CHECK(B == q.size(0) && HD == q.size(3), errc::invalid_argument,
               "{}: k is {} but q is {}: batch and head_dim must match", op, k.describe(), q.describe());
  const int64_t inner = Tk * NKV * HD;
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"k", &k}, {"v", &v}}) {
    const auto& st = t->strides();
    const bool rows_ok = st[3] == 1 && st[2] == HD && st[1] == NKV * HD;
    TROUPE_CHECK(rows_ok && (B <= 1 || st[0] >= inner), errc::invalid_argument,
                 "{}: argument '{}' ({}, strides {}) must be contiguous inside each batch (a batch slice of a KV "
                 "cache is fine)",
                 op, name, t->describe(), shape_str(st));
  }
  TROUPE_CHECK(B <= 1 || k.strides()[0] == v.strides()[0], errc::invalid_argument,
               "{}: k and v must share the batch stride, got {} and {}", op, k.strides()[0], v.strides()[0]);
  return B <= 1 ? inner : k.strides()[0];
}

attention_dims attn_dims(const char* op, const tensor& q, const tensor& k, const tensor& v,
                         const attention_options& opt) {
  check_arg(op, "q", q, f32);
  check_ndim(op, "q", q, 4);
  attention_dims d;
  d.kv_stride_b = check_kv(op, k, v, q);
  d.B = q.size(0);
  d.Tq = q.size(1);
  d.NH = q.size(2);
  d.HD = q.size(3);
  d.Tk = k.size(1);
  d.NKV = k.size(2);
  d.scale = opt.scale;
  d.window = opt.window;
  TROUPE_CHECK(d.Tq <= d.Tk, errc::invalid_argument, "{}: q has Tq={} queries but k only Tk={} keys ({} vs {})", op,
               d.Tq, d.Tk, q.describe(), k.describe());
  TROUPE_CHECK(d.NKV > 0 && d.NH % d.NKV == 0, errc::invalid_argument,
               "{}: q heads {} must be a multiple of kv heads {} ({} vs {})", op, d.NH, d.NKV, q.describe(),
               k.describe());
  return d;
}
}  // namespace

// ---- forward ----------------------------------------------------------------------------

void embedding_forward(tensor& out, const tensor& ids, const tensor& wte, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "embedding_forward";
  check_arg(op, "ids", ids, i32);
  check_arg(op, "wte", wte, f32);
  check_arg(op, "out", out, f32);
  check_ndim(op, "wte", wte, 2);
  const int64_t V = wte.size(0), C = wte.size(1), N = ids.numel();
  check_shape(op, "out", out, with_last(ids.shape(), C), "(ids' shape + [C])");
  const device dev = common_device(op, {{"out", &out}, {"ids", &ids}, {"wte", &wte}});
  if (dev.is_cpu()) return cpu::embedding_forward(fp(out), ip(ids), fp(wte), N, C, V);
#ifdef TROUPE_HAVE_CUDA
  check_ids_on_host(op, "ids", ids, V, false, stream);
  cuda_guard g(dev);
  cuda::embedding_forward(fp(out), ip(ids), fp(wte), N, C, V, stream);
#endif
}

void matmul_forward(tensor& out, const tensor& inp, const tensor& weight, const tensor* bias, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "matmul_forward";
  check_arg(op, "inp", inp, f32);
  check_arg(op, "weight", weight, f32);
  check_arg(op, "out", out, f32);
  check_ndim(op, "weight", weight, 2);
  const int64_t C = last_dim(op, "inp", inp), OC = weight.size(0), N = inp.numel() / (C ? C : 1);
  check_shape(op, "weight", weight, {OC, C}, fmt::format("(OC, C) with C = inp's last dim, inp is {}", inp.describe()));
  if (bias) {
    check_arg(op, "bias", *bias, f32);
    check_shape(op, "bias", *bias, {OC}, "(OC)");
  }
  check_shape(op, "out", out, with_last(leading(inp), OC), "(inp's leading dims + [OC])");
  const device dev = common_device(op, {{"out", &out}, {"inp", &inp}, {"weight", &weight}, {"bias", bias}});
  if (dev.is_cpu()) return cpu::matmul_forward(fp(out), fp(inp), fp(weight), fp(bias), N, C, OC);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::matmul_forward(fp(out), fp(inp), fp(weight), fp(bias), N, C, OC, stream);
#endif
}

void rmsnorm_forward(tensor& out, tensor* rstd, const tensor& x, const tensor& w, float eps, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "rmsnorm_forward";
  check_arg(op, "x", x, f32);
  check_arg(op, "w", w, f32);
  check_arg(op, "out", out, f32);
  const int64_t C = last_dim(op, "x", x), N = x.numel() / (C ? C : 1);
  check_shape(op, "w", w, {C}, fmt::format("(C), x is {}", x.describe()));
  check_shape(op, "out", out, x.shape(), "(as x)");
  if (rstd) {
    check_arg(op, "rstd", *rstd, f32);
    check_shape(op, "rstd", *rstd, leading(x), "(x's leading dims)");
  }
  const device dev = common_device(op, {{"out", &out}, {"x", &x}, {"w", &w}, {"rstd", rstd}});
  if (dev.is_cpu()) return cpu::rmsnorm_forward(fp(out), fp(rstd), fp(x), fp(w), N, C, eps);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::rmsnorm_forward(fp(out), fp(rstd), fp(x), fp(w), N, C, eps, stream);
#endif
}

void rope_forward(tensor& out, const tensor& inp, const tensor& cos, const tensor& sin, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "rope_forward";
  check_arg(op, "inp", inp, f32);
  check_arg(op, "cos", cos, f32);
  check_arg(op, "sin", sin, f32);
  check_arg(op, "out", out, f32);
  check_ndim(op, "inp", inp, 4);
  check_ndim(op, "cos", cos, 2);
  const int64_t B = inp.size(0), T = inp.size(1), NH = inp.size(2), HD = inp.size(3), rot = 2 * cos.size(1);
  check_shape(op, "cos", cos, {T, cos.size(1)}, fmt::format("(T, rotary_dim/2), inp is {}", inp.describe()));
  check_shape(op, "sin", sin, cos.shape(), "(as cos)");
  check_shape(op, "out", out, inp.shape(), "(as inp)");
  const device dev = common_device(op, {{"out", &out}, {"inp", &inp}, {"cos", &cos}, {"sin", &sin}});
  if (dev.is_cpu()) return cpu::rope_forward(fp(out), fp(inp), fp(cos), fp(sin), B, T, NH, HD, rot);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::rope_forward(fp(out), fp(inp), fp(cos), fp(sin), B, T, NH, HD, rot, stream);
#endif
}

void attention_forward(tensor& out, tensor* lse, const tensor& q, const tensor& k, const tensor& v,
                       const attention_options& opt, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "attention_forward";
  const attention_dims d = attn_dims(op, q, k, v, opt);
  check_arg(op, "out", out, f32);
  check_shape(op, "out", out, q.shape(), "(as q)");
  if (lse) {
    check_arg(op, "lse", *lse, f32);
    check_shape(op, "lse", *lse, {d.B, d.NH, d.Tq}, "(B, NH, Tq)");
  }
  const device dev = common_device(op, {{"out", &out}, {"q", &q}, {"k", &k}, {"v", &v}, {"lse", lse}});
  if (dev.is_cpu()) return cpu::attention_forward(fp(out), fp(lse), fp(q), fp(k), fp(v), d);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::attention_forward(fp(out), fp(lse), fp(q), fp(k), fp(v), d, stream);
#endif
}

void swiglu_forward(tensor& out, const tensor& gate, const tensor& up, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "swiglu_forward";
  check_arg(op, "gate", gate, f32);
  check_arg(op, "up", up, f32);
  check_arg(op, "out", out, f32);
  const int64_t I = last_dim(op, "gate", gate), N = gate.numel() / (I ? I : 1);
  check_shape(op, "up", up, gate.shape(), "(as gate)");
  check_shape(op, "out", out, gate.shape(), "(as gate)");
  const device dev = common_device(op, {{"out", &out}, {"gate", &gate}, {"up", &up}});
  if (dev.is_cpu()) return cpu::swiglu_forward(fp(out), fp(gate), fp(up), N, I);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::swiglu_forward(fp(out), fp(gate), fp(up), N, I, stream);
#endif
}

void cross_entropy_forward(tensor& losses, const tensor& logits, const tensor& targets, void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "cross_entropy_forward";
  check_arg(op, "logits", logits, f32);
  check_arg(op, "targets", targets, i32);
  check_arg(op, "losses", losses, f32);
  const int64_t V = last_dim(op, "logits", logits), N = logits.numel() / (V ? V : 1);
  check_shape(op, "targets", targets, leading(logits), fmt::format("(logits' leading dims), logits is {}", logits.describe()));
  check_shape(op, "losses", losses, leading(logits), "(logits' leading dims)");
  const device dev = common_device(op, {{"losses", &losses}, {"logits", &logits}, {"targets", &targets}});
  if (dev.is_cpu()) return cpu::cross_entropy_forward(fp(losses), fp(logits), ip(targets), N, V);
#ifdef TROUPE_HAVE_CUDA
  check_ids_on_host(op, "targets", targets, V, true, stream);
  cuda_guard g(dev);
  cuda::cross_entropy_forward(fp(losses), fp(logits), ip(targets), N, V, stream);
#endif
}

void adamw_update(tensor& param, const tensor& grad, tensor& m, tensor& v, const adamw_params& hp, int64_t step,
                  void* stream) {
  (void)stream;  // the cpu path has no stream
  const char* op = "adamw_update";
  check_arg(op, "param", param, f32);
  check_arg(op, "grad", grad, f32);
  check_arg(op, "m", m, f32);
  check_arg(op, "v", v, f32);
  check_shape(op, "grad", grad, param.shape(), "(as param)");
  check_shape(op, "m", m, param.shape(), "(as param)");
  check_shape(op, "v", v, param.shape(), "(as param)");
  const device dev = common_device(op, {{"param", &param}, {"grad", &grad}, {"m", &m}, {"v", &v}});
  if (dev.is_cpu()) return cpu::adamw_update(fp(param), fp(grad), fp(m), fp(v), param.numel(), hp, step);
#ifdef TROUPE_HAVE_CUDA
  cuda_guard g(dev);
  cuda::adamw_update(fp(param), fp(grad), fp(m), fp(v), param.numel(), hp, step, stream);
#endif
}

// ---- backward (cpu only) ----------------------------------------------------------------

void embedding_backward(tensor& dwte, const tensor& dout, const tensor& ids) {
  const char* op = "embedding_backward";
  check_arg(op, "dwte", dwte, f32);
  check_arg(op, "dout", dout, f32);
  check_arg(op, "ids", ids, i32);
  check_ndim(op, "dwte", dwte, 2);
  const int64_t V = dwte.size(0), C = dwte.size(1);
  check_shape(op, "dout", dout, with_last(ids.shape(), C), "(ids' shape + [C])");
  require_cpu("backward of embedding", common_device(op, {{"dwte", &dwte}, {"dout", &dout}, {"ids", &ids}}));
  cpu::embedding_backward(fp(dwte), fp(dout), ip(ids), ids.numel(), C, V);
}

void matmul_backward(tensor* dinp, tensor* dweight, tensor* dbias, const tensor& dout, const tensor& inp,
                     const tensor& weight) {
  const char* op = "matmul_backward";
  check_arg(op, "inp", inp, f32);
  check_arg(op, "weight", weight, f32);
  check_arg(op, "dout", dout, f32);
  check_ndim(op, "weight", weight, 2);
  const int64_t C = last_dim(op, "inp", inp), OC = weight.size(0), N = inp.numel() / (C ? C : 1);
  check_shape(op, "weight", weight, {OC, C}, fmt::format("(OC, C), inp is {}", inp.describe()));
  check_shape(op, "dout", dout, with_last(leading(inp), OC), "(inp's leading dims + [OC])");
  for (auto [name, t, want] : {std::tuple<const char*, tensor*, shape_t>{"dinp", dinp, inp.shape()},
                               {"dweight", dweight, weight.shape()}, {"dbias", dbias, shape_t{OC}}}) {
    if (t == nullptr) continue;
    check_arg(op, name, *t, f32);
    check_shape(op, name, *t, want);
  }
  require_cpu("backward of matmul", common_device(op, {{"dout", &dout}, {"inp", &inp}, {"weight", &weight},
                                                       {"dinp", dinp}, {"dweight", dweight}, {"dbias", dbias}}));
  cpu::matmul_backward(fp(dinp), fp(dweight), fp(dbias), fp(dout), fp(inp), fp(weight), N, C, OC);
}

void rmsnorm_backward(tensor& dx, tensor* dw, const tensor& dout, const tensor& x, const tensor& w,
                      const tensor& rstd) {
  const char* op = "rmsnorm_backward";
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"dx", &dx}, {"dout", &dout}, {"x", &x}, {"w", &w},
                         {"rstd", &rstd}})
    check_arg(op, name, *t, f32);
  const int64_t C = last_dim(op, "x", x), N = x.numel() / (C ? C : 1);
  check_shape(op, "w", w, {C}, fmt::format("(C), x is {}", x.describe()));
  check_shape(op, "dout", dout, x.shape(), "(as x)");
  check_shape(op, "dx", dx, x.shape(), "(as x)");
  check_shape(op, "rstd", rstd, leading(x), "(x's leading dims)");
  if (dw) {
    check_arg(op, "dw", *dw, f32);
    check_shape(op, "dw", *dw, {C}, "(C)");
  }
  require_cpu("backward of rmsnorm", common_device(op, {{"dx", &dx}, {"dout", &dout}, {"x", &x}, {"w", &w},
                                                        {"rstd", &rstd}, {"dw", dw}}));
  cpu::rmsnorm_backward(fp(dx), fp(dw), fp(dout), fp(x), fp(w), fp(rstd), N, C);
}

void rope_backward(tensor& dinp, const tensor& dout, const tensor& cos, const tensor& sin) {
  const char* op = "rope_backward";
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"dinp", &dinp}, {"dout", &dout}, {"cos", &cos},
                         {"sin", &sin}})
    check_arg(op, name, *t, f32);
  check_ndim(op, "dout", dout, 4);
  check_ndim(op, "cos", cos, 2);
  const int64_t B = dout.size(0), T = dout.size(1), NH = dout.size(2), HD = dout.size(3), rot = 2 * cos.size(1);
  check_shape(op, "cos", cos, {T, cos.size(1)}, fmt::format("(T, rotary_dim/2), dout is {}", dout.describe()));
  check_shape(op, "sin", sin, cos.shape(), "(as cos)");
  check_shape(op, "dinp", dinp, dout.shape(), "(as dout)");
  require_cpu("backward of rope",
              common_device(op, {{"dinp", &dinp}, {"dout", &dout}, {"cos", &cos}, {"sin", &sin}}));
  cpu::rope_backward(fp(dinp), fp(dout), fp(cos), fp(sin), B, T, NH, HD, rot);
}

void attention_backward(tensor& dq, tensor& dk, tensor& dv, const tensor& dout, const tensor& q, const tensor& k,
                        const tensor& v, const tensor& out, const tensor& lse, const attention_options& opt) {
  const char* op = "attention_backward";
  const attention_dims d = attn_dims(op, q, k, v, opt);
  TROUPE_CHECK(d.Tq == d.Tk, errc::invalid_argument, "{}: backward needs Tq == Tk, got {} and {}", op, d.Tq, d.Tk);
  check_arg(op, "k", k, f32);
  check_arg(op, "v", v, f32);
  for (auto [name, t, want] : {std::tuple<const char*, const tensor*, shape_t>{"dout", &dout, q.shape()},
                               {"out", &out, q.shape()}, {"dq", &dq, q.shape()}, {"dk", &dk, k.shape()},
                               {"dv", &dv, k.shape()}, {"lse", &lse, shape_t{d.B, d.NH, d.Tq}}}) {
    check_arg(op, name, *t, f32);
    check_shape(op, name, *t, want);
  }
  require_cpu("backward of attention",
              common_device(op, {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}, {"dout", &dout}, {"q", &q}, {"k", &k},
                                 {"v", &v}, {"out", &out}, {"lse", &lse}}));
  cpu::attention_backward(fp(dq), fp(dk), fp(dv), fp(dout), fp(q), fp(k), fp(v), fp(out), fp(lse), d);
}

void swiglu_backward(tensor& dgate, tensor& dup, const tensor& dout, const tensor& gate, const tensor& up) {
  const char* op = "swiglu_backward";
  for (auto [name, t] : {std::pair<const char*, const tensor*>{"dgate", &dgate}, {"dup", &dup}, {"dout", &dout},
                         {"gate", &gate}, {"up", &up}}) {
    check_arg(op, name, *t, f32);
    if (t != &gate) check_shape(op, name, *t, gate.shape(), "(as gate)");
  }
  const int64_t I = last_dim(op, "gate", gate), N = gate.numel() / (I ? I : 1);
  require_cpu("backward of swiglu", common_device(op, {{"dgate", &dgate}, {"dup", &dup}, {"dout", &dout},
                                                       {"gate", &gate}, {"up", &up}}));
  cpu::swiglu_backward(fp(dgate), fp(dup), fp(dout), fp(gate), fp(up), N, I);
}

void classifier_forward_backward(tensor& losses, tensor* dh, tensor* dW, const tensor& h, const tensor& W,
                                 const tensor& targets, float grad_scale, int64_t chunk_tokens) {
  const char* op = "classifier_forward_backward";
  check_arg(op, "h", h, f32);
  check_arg(op, "W", W, f32);
  check_arg(op, "targets", targets, i32);
  check_arg(op, "losses", losses, f32);
  check_ndim(op, "W", W, 2);
  const int64_t C = last_dim(op, "h", h), V = W.size(0), N = h.numel() / (C ? C : 1);
  check_shape(op, "W", W, {V, C}, fmt::format("(V, C), h is {}", h.describe()));
  check_shape(op, "targets", targets, leading(h), "(h's leading dims)");
  check_shape(op, "losses", losses, leading(h), "(h's leading dims)");
  if (dh) {
    check_arg(op, "dh", *dh, f32);
    check_shape(op, "dh", *dh, h.shape(), "(as h)");
  }
  if (dW) {
    check_arg(op, "dW", *dW, f32);
    check_shape(op, "dW", *dW, W.shape(), "(as W)");
  }
  require_cpu("classifier_forward_backward",
              common_device(op, {{"losses", &losses}, {"h", &h}, {"W", &W}, {"targets", &targets}, {"dh", dh},
                                 {"dW", dW}}));
  cpu::classifier_forward_backward(fp(losses), fp(dh), fp(dW), fp(h), fp(W), ip(targets), N, C, V, grad_scale,
                                   chunk_tokens);
}

}  // namespace troupe::kernels
