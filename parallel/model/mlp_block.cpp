// parallel/model/mlp_block.cpp — SwiGLU MLP forward/backward from the kernels.
#include "parallel/model/mlp_block.h"

#include <vector>

#include "kernels/matmul.h"
#include "kernels/swiglu.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;

mlp_activations mlp_activations::allocate(int64_t N, int64_t I) {
  return {runtime::tensor::empty({N, I}), runtime::tensor::empty({N, I}), runtime::tensor::empty({N, I})};
}

void mlp_forward(float* out, mlp_activations& a, const float* x, const runtime::tensor& w_gate,
                 const runtime::tensor& w_up, const runtime::tensor& w_down, int64_t N, int64_t C, int64_t I) {
  if (a.h_gate.numel() != N * I) a = mlp_activations::allocate(N, I);
  kc::matmul_forward(a.h_gate.data<float>(), x, w_gate.data<float>(), nullptr, N, C, I);
  kc::matmul_forward(a.h_up.data<float>(), x, w_up.data<float>(), nullptr, N, C, I);
  kc::swiglu_forward(a.act.data<float>(), a.h_gate.data<float>(), a.h_up.data<float>(), N, I);
  kc::matmul_forward(out, a.act.data<float>(), w_down.data<float>(), nullptr, N, I, C);
}

void mlp_backward(float* dx, const runtime::tensor& dw_gate, const runtime::tensor& dw_up,
                  const runtime::tensor& dw_down, const float* dout, const mlp_activations& a, const float* x,
                  const runtime::tensor& w_gate, const runtime::tensor& w_up, const runtime::tensor& w_down,
                  int64_t N, int64_t C, int64_t I) {
  runtime::work_buffer dact(static_cast<size_t>(N * I)), dgate(dact.size()), dup(dact.size());
  runtime::work_buffer tmp(static_cast<size_t>(N * C));
  // out = act @ Wd^T
  kc::matmul_backward(dact.data(), fptr(dw_down), nullptr, dout, a.act.data<float>(), w_down.data<float>(), N, I, C);
  kc::swiglu_backward(dgate.data(), dup.data(), dact.data(), a.h_gate.data<float>(), a.h_up.data<float>(), N, I);
  kc::matmul_backward(dx, fptr(dw_gate), nullptr, dgate.data(), x, w_gate.data<float>(), N, C, I);
  kc::matmul_backward(tmp.data(), fptr(dw_up), nullptr, dup.data(), x, w_up.data<float>(), N, C, I);
  const int64_t n = N * C;
  for (int64_t i = 0; i < n; ++i) dx[i] += tmp[static_cast<size_t>(i)];
}

}  // namespace troupe::parallel
