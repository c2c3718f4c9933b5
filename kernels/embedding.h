// kernels/embedding.h — token embedding lookup.
//
//   cpu::embedding_forward(out, ids, wte, N, C, V);     // out[n] = wte[ids[n]]
//   cpu::embedding_backward(dwte, dout, ids, N, C, V);  // dwte[ids[n]] += dout[n]
//
// Invariants:
//   1. An id outside [0, V) throws errc::out_of_range naming the position and the id.
//   2. backward accumulates into dwte (a parameter gradient), in token order.
#pragma once
#include <cstdint>

namespace troupe::kernels {
namespace cpu {
// ids: (N)  wte: (V, C)  ->  out: (N, C)
void embedding_forward(float* out, const int32_t* ids, const float* wte, int64_t N, int64_t C, int64_t V);
// dout: (N, C)  ->  dwte: (V, C) +=
void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int64_t N, int64_t C, int64_t V);
}  // namespace cpu
namespace cuda {
// Same contract; ids are not range-checked on the device (check on the host first).
void embedding_forward(float* out, const int32_t* ids, const float* wte, int64_t N, int64_t C, int64_t V,
                       void* stream = nullptr);
}  // namespace cuda
}  // namespace troupe::kernels
