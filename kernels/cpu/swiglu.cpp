// kernels/cpu/swiglu.cpp — SwiGLU gate: out = silu(gate) * up, silu(g) = g * sigmoid(g).
#include "kernels/swiglu.h"

#include <cmath>

namespace troupe::kernels::cpu {

namespace {
// Stable for any g: exp never sees a large positive argument.
inline float sigmoid(float g) {
  if (g >= 0.0f) return 1.0f / (1.0f + std::exp(-g));
  const float e = std::exp(g);
  return e / (1.0f + e);
}
}  // namespace

// gate, up: (N, I)  ->  out: (N, I)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t I) {
  const int64_t n = N * I;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
  }
}

// dout: (N, I)  ->  dgate, dup: (N, I) =   (each nullable)
//   d/dg silu(g) = s (1 + g (1 - s)),  s = sigmoid(g)
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t N,
                     int64_t I) {
  const int64_t n = N * I;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float u = up[i];
    const float d = dout[i];
    const float s = sigmoid(g);
    if (dgate != nullptr) dgate[i] = d * u * (s * (1.0f + g * (1.0f - s)));
    if (dup != nullptr) dup[i] = d * (g * s);
  }
}

}  // namespace troupe::kernels::cpu
