// kernels/cpu/embedding.cpp — token embedding lookup (forward) and scatter-add (backward).
#include "kernels/embedding.h"

#include <cstring>

#include "runtime/error.h"

namespace troupe::kernels::cpu {

namespace {
using runtime::errc;

// Every id is checked before anything is written, so bad input leaves outputs untouched.
void check_ids(const int32_t* ids, int64_t N, int64_t V, const char* where) {
  for (int64_t n = 0; n < N; ++n)
    TROUPE_CHECK(ids[n] >= 0 && ids[n] < V, errc::out_of_range,
                 "{}: token id {} at position {} is outside the vocabulary [0, {}); check the tokenizer "
                 "matches the model's vocab_size",
                 where, ids[n], n, V);
}
}  // namespace

// ids: (N)  wte: (V, C)  ->  out: (N, C)
void embedding_forward(float* out, const int32_t* ids, const float* wte, int64_t N, int64_t C, int64_t V) {
  check_ids(ids, N, V, "embedding_forward");
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(out + n * C, wte + static_cast<int64_t>(ids[n]) * C, static_cast<size_t>(C) * sizeof(float));
}

// dout: (N, C)  ->  dwte: (V, C) +=
// Threads own disjoint column blocks and walk the tokens in order, so every dwte
// element sums its contributions in token order whatever the thread count.
void embedding_backward(float* dwte, const float* dout, const int32_t* ids, int64_t N, int64_t C, int64_t V) {
  check_ids(ids, N, V, "embedding_backward");
  constexpr int64_t col_block = 256;
  const int64_t n_blocks = (C + col_block - 1) / col_block;
#pragma omp parallel for schedule(static)
  for (int64_t cb = 0; cb < n_blocks; ++cb) {
    const int64_t c0 = cb * col_block;
    const int64_t c1 = c0 + col_block < C ? c0 + col_block : C;
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dwte + static_cast<int64_t>(ids[n]) * C;
      const float* src = dout + n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace troupe::kernels::cpu
