// kernels/rope.h — rotary position embedding, HF "rotate_half" convention, with the
// scaling variants of HF transformers' rope_scaling (linear, dynamic, yarn, llama3).
//
//   rope_config rc = {.head_dim = 64, .theta = 500000, .type = rope_type::llama3, ...};
//   rope_params p = rope_compute_params(rc, seq_len);          // inv_freq + attention scaling
//   std::vector<float> cos(T * 32), sin(T * 32);
//   rope_build_table(cos.data(), sin.data(), positions, T, p);  // (T, head_dim/2)
//   cpu::rope_forward(q, q, cos.data(), sin.data(), B, T, NH, 64, p.rotary_dim);  // in place
//
// Invariants:
//   1. Pairs are (i, i + head_dim/2), as HF's rotate_half; tables are (T, head_dim/2).
//   2. cos/sin already include the attention scaling (yarn's mscale), as HF does.
//   3. backward is the inverse rotation (transpose) and may run in place.
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/rope_config.h"

namespace troupe::kernels {

using runtime::rope_config;
using runtime::rope_type;

struct rope_params {
  std::vector<float> inv_freq;      // (rotary_dim / 2)
  float attention_scaling = 1.0f;   // multiplies cos and sin
  int64_t rotary_dim = 0;           // head_dim * partial_rotary_factor
};

// seq_len matters for `dynamic` only (the NTK base grows past max_position_embeddings).
rope_params rope_compute_params(const rope_config& cfg, int64_t seq_len);
// positions: (T)  ->  cos, sin: (T, rotary_dim/2)
void rope_build_table(float* cos, float* sin, const int64_t* positions, int64_t T, const rope_params& p);

namespace cpu {
// inp: (B, T, NH, HD)  cos, sin: (T, rotary_dim/2)  ->  out: (B, T, NH, HD); out may alias inp.
// Dims [rotary_dim, HD) pass through unchanged.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t NH, int64_t HD, int64_t rotary_dim);
// dout: (B, T, NH, HD)  ->  dinp: (B, T, NH, HD) =; dinp may alias dout.
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t NH, int64_t HD, int64_t rotary_dim);
}  // namespace cpu
namespace cuda {
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t B, int64_t T,
                  int64_t NH, int64_t HD, int64_t rotary_dim, void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
