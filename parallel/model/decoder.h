// parallel/model/decoder.h — a whole decoder model (embedding, layers, final norm,
// LM head) on the cpu in fp32: logits for inference, loss + gradients for training,
// and incremental decoding with a KV cache.
//
//   model_weights w = model_weights::load(dir);
//   decoder dec(w);
//   tensor logits = dec.forward_logits(ids, B, T);                  // (B, T, V)
//   model_weights g = model_weights::zeros_like(w);
//   float loss = dec.forward_backward(ids, targets, B, T, g);       // g += dloss/dw
//   kv_cache cache(w.config(), B, T + 16);
//   tensor last = dec.forward_cached(ids, B, T, cache);             // (B, V), then 1 token/step
//
// Invariants:
//   1. ids, targets: (B, T) int32, row-major; ids in [0, V) (else errc::out_of_range).
//      A target < 0 is ignored; the loss is the mean over the others (0 when there are none,
//      and then no gradient is added).
//   2. forward_backward never materialises the (B*T, V) logits: the LM head and the
//      cross-entropy run fused and chunked (kernels::cpu::classifier_forward_backward).
//   3. Gradients are accumulated (+=) into `grads`, a set with the same names and shapes;
//      tied embeddings receive the embedding and the LM-head gradient.
//   4. The per-layer saved activations of the last forward_backward/forward_loss stay in
//      saved() (layer_activations, the MEMO hook) until the next call.
//   5. forward_cached(x) over a cache holding a prefix gives the same logits (fp32 rounding
//      aside) as forward_logits over prefix+x at the new positions.
//   6. The decoder keeps a reference to the weights: they must outlive it.
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/model/decoder_layer.h"
#include "parallel/model/kv_cache.h"
#include "parallel/model/model_weights.h"

namespace troupe::parallel {

class decoder {
 public:
  explicit decoder(const model_weights& w);

  const model_weights& weights() const { return *w_; }
  const model_config& config() const { return w_->config(); }

  // ids: (B, T)  ->  logits: (B, T, V)
  runtime::tensor forward_logits(const int32_t* ids, int64_t B, int64_t T) const;
  // ids: i32 or i64 tensor (B, T)
  runtime::tensor forward_logits(const runtime::tensor& ids) const;
  // ids: (B, T) new tokens appended to `cache`  ->  logits of each sequence's last token (B, V)
  runtime::tensor forward_cached(const int32_t* ids, int64_t B, int64_t T, kv_cache& cache) const;

  // -> mean loss; grads +=
  float forward_backward(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T, model_weights& grads);
  // -> mean loss (no gradient); saved() holds the activations
  float forward_loss(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T);

  const std::vector<layer_activations>& saved() const { return saved_; }

 private:
  // Embedding + layers + final norm of T tokens at positions [pos0, pos0+T). -> h: (N, C)
  // With `save`, per-layer activations go to saved_ and the final norm's to final_*.
  runtime::tensor run(const int32_t* ids, int64_t B, int64_t T, kv_cache* cache,
                      std::vector<layer_activations>* save, runtime::tensor* x_final, runtime::tensor* rstd_final,
                      std::vector<float>* cos, std::vector<float>* sin) const;

  const model_weights* w_;
  std::vector<layer_activations> saved_;
};

// targets[b, t] = ids[b, t+1], and -1 (ignored) at t = T-1: HF's causal-LM labels=input_ids.
std::vector<int32_t> shift_targets(const std::vector<int32_t>& ids, int64_t B, int64_t T);

}  // namespace troupe::parallel
