// kernels/cpu/cross_entropy.cpp — cross-entropy from logits, and the fused, chunked
// LM head (logits -> loss -> dlogits -> dh, dW) that never holds more than chunk_tokens * V logits.
#include "kernels/cross_entropy.h"

#include "kernels/cpu/blas.h"
#include <cblas.h>

#include <cmath>
#include <vector>

#include "runtime/error.h"

namespace troupe::kernels::cpu {

namespace {
using runtime::errc;

void check_targets(const int32_t* targets, int64_t N, int64_t V, const char* where) {
  for (int64_t n = 0; n < N; ++n)
    TROUPE_CHECK(targets[n] < V, errc::out_of_range,
                 "{}: target {} at position {} is >= vocab size {}; use a negative id (-100) to ignore a "
                 "position",
                 where, targets[n], n, V);
}

struct row_stats {
  float max;
  double sum;  // sum exp(x - max)
};

row_stats softmax_stats(const float* x, int64_t V) {
  float mx = x[0];
  for (int64_t i = 1; i < V; ++i) mx = x[i] > mx ? x[i] : mx;
  double s = 0.0;
  for (int64_t i = 0; i < V; ++i) s += static_cast<double>(std::exp(x[i] - mx));
  return {mx, s};
}

// -log softmax(x)[target], given the target's logit and the row's stats
float row_loss(float x_target, const row_stats& st) {
  return static_cast<float>(std::log(st.sum) + static_cast<double>(st.max) - static_cast<double>(x_target));
}
}  // namespace

// logits: (N, V)  targets: (N)  ->  losses: (N)
void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t N, int64_t V) {
  TROUPE_CHECK(V > 0, errc::invalid_argument, "cross_entropy_forward: vocab size {} must be > 0", V);
  check_targets(targets, N, V, "cross_entropy_forward");
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] < 0) {
      losses[n] = 0.0f;
      continue;
    }
    const float* x = logits + n * V;
    losses[n] = row_loss(x[targets[n]], softmax_stats(x, V));
  }
}

// h: (N, C)  W: (V, C)  targets: (N)  ->  losses: (N), dh: (N, C) =, dW: (V, C) +=
void classifier_forward_backward(float* losses, float* dh, float* dW, const float* h, const float* W,
                                 const int32_t* targets, int64_t N, int64_t C, int64_t V, float grad_scale,
                                 int64_t chunk_tokens) {
  TROUPE_CHECK(V > 0 && C > 0, errc::invalid_argument,
               "classifier_forward_backward: vocab size {} and channels {} must be > 0", V, C);
  TROUPE_CHECK(chunk_tokens > 0, errc::invalid_argument,
               "classifier_forward_backward: chunk_tokens {} must be > 0", chunk_tokens);
  check_targets(targets, N, V, "classifier_forward_backward");
  const bool need_grad = dh != nullptr || dW != nullptr;
  const int64_t chunk = chunk_tokens < N ? chunk_tokens : N;
  if (chunk <= 0) return;
  std::vector<float> logits(static_cast<size_t>(chunk * V));  // (chunk, V), reused for dlogits

  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t cn = n0 + chunk <= N ? chunk : N - n0;
    const float* hc = h + n0 * C;
    // logits = h_chunk @ W^T : (cn, V)
    sgemm(false, true, cn, V, C, 1.0f, hc, C, W, C, 0.0f, logits.data(), V);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < cn; ++r) {
      float* x = logits.data() + r * V;
      const int32_t tgt = targets[n0 + r];
      if (tgt < 0) {
        losses[n0 + r] = 0.0f;
        if (need_grad)
          for (int64_t i = 0; i < V; ++i) x[i] = 0.0f;
        continue;
      }
      if (!need_grad) {
        losses[n0 + r] = row_loss(x[tgt], softmax_stats(x, V));
        continue;
      }
      // One exp pass: x = exp(x - max), then dlogits = (softmax - onehot) * grad_scale in place.
      float mx = x[0];
      for (int64_t i = 1; i < V; ++i) mx = x[i] > mx ? x[i] : mx;
      const float x_tgt = x[tgt];
      double sum = 0.0;
      for (int64_t i = 0; i < V; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += static_cast<double>(x[i]);
      }
      losses[n0 + r] = row_loss(x_tgt, {mx, sum});
      const float mul = static_cast<float>(1.0 / sum) * grad_scale;
      for (int64_t i = 0; i < V; ++i) x[i] *= mul;
      x[tgt] -= grad_scale;
    }
    if (dh != nullptr)  // dh_chunk = dlogits @ W : (cn, C)
      sgemm(false, false, cn, C, V, 1.0f, logits.data(), V, W, C, 0.0f, dh + n0 * C, C);
    if (dW != nullptr)  // dW += dlogits^T @ h_chunk : (V, C)
      sgemm(true, false, V, C, cn, 1.0f, logits.data(), V, hc, C, 1.0f, dW, C);
  }
}

}  // namespace troupe::kernels::cpu
