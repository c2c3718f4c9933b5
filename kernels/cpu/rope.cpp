// kernels/cpu/rope.cpp — the RoPE rotation (HF rotate_half pairs (i, i + rotary_dim/2)).
#include "kernels/rope.h"

#include "runtime/error.h"

namespace troupe::kernels::cpu {

namespace {
using runtime::errc;

void check_dims(int64_t HD, int64_t rotary_dim, const char* where) {
  TROUPE_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= HD, errc::invalid_argument,
               "{}: rotary_dim {} must be even and in (0, head_dim {}]", where, rotary_dim, HD);
}

// sign = +1: forward rotation; sign = -1: its transpose (the inverse, used by backward).
//   out_i     = x_i     cos - sign x_{i+h} sin
//   out_{i+h} = x_{i+h} cos + sign x_i     sin
template <int Sign>
void rope_rotate(float* out, const float* inp, const float* cos, const float* sin, int64_t B, int64_t T,
                 int64_t NH, int64_t HD, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < NH; ++h) {
        const int64_t off = ((b * T + t) * NH + h) * HD;
        const float* x = inp + off;
        float* y = out + off;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = x[i];
          const float x1 = x[i + half];
          if constexpr (Sign > 0) {
            y[i] = x0 * c[i] - x1 * s[i];
            y[i + half] = x1 * c[i] + x0 * s[i];
          } else {
            y[i] = x0 * c[i] + x1 * s[i];
            y[i + half] = x1 * c[i] - x0 * s[i];
          }
        }
        if (y != x)
          for (int64_t i = rotary_dim; i < HD; ++i) y[i] = x[i];
      }
    }
  }
}
}  // namespace

// inp: (B, T, NH, HD)  cos, sin: (T, rotary_dim/2)  ->  out: (B, T, NH, HD); out may alias inp.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t NH, int64_t HD, int64_t rotary_dim) {
  check_dims(HD, rotary_dim, "rope_forward");
  rope_rotate<1>(out, inp, cos, sin, B, T, NH, HD, rotary_dim);
}

// dout: (B, T, NH, HD)  ->  dinp: (B, T, NH, HD) =; dinp may alias dout.
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t NH, int64_t HD, int64_t rotary_dim) {
  check_dims(HD, rotary_dim, "rope_backward");
  rope_rotate<-1>(dinp, dout, cos, sin, B, T, NH, HD, rotary_dim);
}

}  // namespace troupe::kernels::cpu
