// kernels/cross_entropy.h — the LM head + cross-entropy, fused and chunked so that the
// (N, V) logits never exist at once: at most chunk_tokens * V floats are live.
//
//   std::vector<float> losses(N);
//   cpu::classifier_forward_backward(losses.data(), dh, dW, h, W, targets, N, C, V,
//                                    /*grad_scale=*/1.0f / n_valid, /*chunk_tokens=*/256);
//   cpu::cross_entropy_forward(losses.data(), logits, targets, N, V);   // logits given
//
// Invariants:
//   1. A target < 0 (HF's -100) is ignored: its loss is 0 and it adds no gradient.
//   2. A target >= V throws errc::out_of_range naming the position.
//   3. dh is written (=) and dW accumulated (+=) with d(loss_n)/d(.) * grad_scale;
//      both nullable (dh == dW == nullptr computes the losses only).
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
// logits: (N, V)  targets: (N)  ->  losses: (N)
void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V);
// h: (N, C)  W: (V, C)  targets: (N)  ->  losses: (N), dh: (N, C) =, dW: (V, C) +=
void classifier_forward_backward(float* losses, float* dh, float* dW, const float* h, const float* W,
                                 const int32_t* targets, int64_t N, int64_t C, int64_t V, float grad_scale,
                                 int64_t chunk_tokens = 256);
}  // namespace cpu
namespace cuda {
void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                           void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
