// parallel/model/decoder.cpp — the whole model: embedding, layers, final norm, LM head.
#include "parallel/model/decoder.h"

#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "parallel/cp/context_parallel.h"
#include "parallel/memo/arena.h"
#include "parallel/memo/swap.h"

namespace troupe::parallel {

namespace kc = troupe::kernels::cpu;
using runtime::errc;
using runtime::tensor;

namespace {

runtime::rope_config rope_of(const model_config& c) {
  runtime::rope_config r = c.rope;
  r.head_dim = c.head_dim;
  if (r.max_position_embeddings <= 0) r.max_position_embeddings = c.max_position_embeddings;
  return r;
}

}  // namespace

int64_t rope_tables(const model_config& c, int64_t pos0, int64_t T, int64_t seq_len, std::vector<float>* cos,
                    std::vector<float>* sin) {
  const kernels::rope_params rp = kernels::rope_compute_params(rope_of(c), seq_len);
  std::vector<int64_t> positions(static_cast<size_t>(T));
  std::iota(positions.begin(), positions.end(), pos0);
  const size_t half = static_cast<size_t>(rp.rotary_dim / 2);
  cos->assign(static_cast<size_t>(T) * half, 0.0f);
  sin->assign(cos->size(), 0.0f);
  kernels::rope_build_table(cos->data(), sin->data(), positions.data(), T, rp);
  return rp.rotary_dim;
}

std::vector<tensor> grad_group_tensors(const model_weights& w, int64_t group) {
  std::vector<tensor> out;
  for (auto& [name, t] : w.parameters()) {
    int64_t g = grad_group::head;
    if (name.rfind("model.embed_tokens.", 0) == 0) {
      g = grad_group::embedding;
    } else if (name.rfind("model.layers.", 0) == 0) {
      g = std::stoll(name.substr(13));  // "model.layers.{l}.…"
    }
    if (g == group) out.push_back(t);
  }
  return out;
}

decoder::decoder(const model_weights& w) : w_(&w) {
  TROUPE_CHECK(!w.layers.empty() && w.embed.defined(), errc::invalid_argument,
               "decoder: the weights are empty (use model_weights::load, allocate or random_init)");
}

void decoder::set_context_parallel(const context_parallel* cp) {
  if (cp != nullptr) cp_check(*cp, config().n_heads, config().n_kv_heads, "decoder::set_context_parallel");
  cp_ = cp;
}

attention_geom decoder::geom(int64_t B, int64_t T, int64_t rotary_dim) const {
  attention_geom g = attention_geom::of(config(), B, T, rotary_dim);
  g.cp = cp_;
  return g;
}

double decoder::denominator(const fb_options& opt, int64_t n_valid, const char* where) const {
  TROUPE_CHECK(std::isfinite(opt.loss_denominator) && opt.loss_denominator >= 0, errc::invalid_argument,
               "{}: fb_options.loss_denominator {} must be finite and >= 0 (0 = this call's valid targets)", where,
               opt.loss_denominator);
  return opt.loss_denominator > 0 ? opt.loss_denominator : static_cast<double>(n_valid);
}

tensor decoder::run(const int32_t* ids, int64_t B, int64_t T, kv_cache* cache, std::vector<layer_activations>* save,
                    tensor* x_final, tensor* rstd_final, std::vector<float>* cos, std::vector<float>* sin,
                    memo::memo_swap* memo, memo::step_arena* arena) const {
  const model_config& c = config();
  TROUPE_CHECK(B > 0 && T > 0, errc::invalid_argument, "decoder: batch {} and tokens {} must be > 0", B, T);
  const int64_t N = B * T, C = c.hidden;
  TROUPE_CHECK(cache == nullptr || cp_ == nullptr, errc::unsupported,
               "decoder: decoding with a KV cache does not run under context parallelism "
               "(call set_context_parallel(nullptr) first)");
  // With context parallelism this rank's T tokens sit at [rank*T, rank*T + T) of T*size.
  const int64_t pos0 = cache ? cache->length() : cp_ ? int64_t{cp_->rank()} * T : 0;
  const int64_t seq_len = cp_ ? T * cp_->size() : pos0 + T;
  if (cache) {
    TROUPE_CHECK(cache->batch() == B, errc::invalid_argument, "decoder: cache batch {} != batch {}", cache->batch(),
                 B);
    cache->check_room(T);
  }
  const attention_geom g = geom(B, T, rope_tables(c, pos0, T, seq_len, cos, sin));

  tensor x = tensor::empty({N, C});
  kc::embedding_forward(x.data<float>(), ids, w_->embed.data<float>(), N, C, c.vocab_size);
  if (save) save->resize(static_cast<size_t>(c.n_layers));
  TROUPE_CHECK(memo == nullptr || (save != nullptr && cache == nullptr), errc::internal,
               "decoder: MEMO swapping needs saved activations and no KV cache");
  TROUPE_CHECK(memo == nullptr || moe_ == nullptr, errc::unsupported,
               "decoder: MEMO swapping does not run with expert parallelism (it swaps whole MoE layers, which "
               "the expert-parallel layer keeps on other ranks); turn memory.memo off or use parallel.ep = 1");
  if (memo) memo->begin_forward(c, B, T);
  layer_activations scratch;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    layer_activations& a = save ? (*save)[static_cast<size_t>(l)] : scratch;
    if (memo) memo->before_forward(l, a);
    if (arena) arena->mark(memo::step_phase::forward_begin, l);
    layer_forward(x.data<float>(), a, w_->layers[static_cast<size_t>(l)], c, g, cos->data(), sin->data(), cache, l,
                  moe_);
    if (arena) arena->mark(memo::step_phase::forward_end, l);
    if (memo) memo->after_forward(l, a);  // overlaps the next layer's forward
  }
  if (memo) memo->end_forward(*save);
  if (cache) cache->advance(T);
  tensor h = tensor::empty({N, C});
  tensor rstd = tensor::empty({N});
  kc::rmsnorm_forward(h.data<float>(), rstd.data<float>(), x.data<float>(), w_->final_norm.data<float>(), N, C,
                      static_cast<float>(c.rms_norm_eps));
  if (x_final) *x_final = x;
  if (rstd_final) *rstd_final = rstd;
  return h;
}

tensor decoder::forward_logits(const int32_t* ids, int64_t B, int64_t T) const {
  const model_config& c = config();
  std::vector<float> cos, sin;
  tensor h = run(ids, B, T, nullptr, nullptr, nullptr, nullptr, &cos, &sin);
  tensor logits = tensor::empty({B, T, c.vocab_size});
  kc::matmul_forward(logits.data<float>(), h.data<float>(), w_->lm_head_or_embed().data<float>(), nullptr, B * T,
                     c.hidden, c.vocab_size);
  return logits;
}

tensor decoder::forward_logits(const tensor& ids) const {
  TROUPE_CHECK(ids.ndim() == 2, errc::invalid_argument, "forward_logits: ids must be (B, T), got {}", ids.describe());
  tensor i32 = ids.dtype() == runtime::dtype::i32 ? ids.contiguous() : ids.to(runtime::dtype::i32);
  return forward_logits(i32.data<int32_t>(), ids.size(0), ids.size(1));
}

tensor decoder::forward_cached(const int32_t* ids, int64_t B, int64_t T, kv_cache& cache) const {
  const model_config& c = config();
  std::vector<float> cos, sin;
  tensor h = run(ids, B, T, &cache, nullptr, nullptr, nullptr, &cos, &sin);
  const int64_t C = c.hidden;
  std::vector<float> last(static_cast<size_t>(B * C));
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(last.data() + b * C, h.data<float>() + (b * T + T - 1) * C, static_cast<size_t>(C) * sizeof(float));
  tensor logits = tensor::empty({B, c.vocab_size});
  kc::matmul_forward(logits.data<float>(), last.data(), w_->lm_head_or_embed().data<float>(), nullptr, B, C,
                     c.vocab_size);
  return logits;
}

float decoder::forward_loss(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T) {
  return forward_loss(ids, targets, B, T, fb_options{});
}

float decoder::forward_loss(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T,
                            const fb_options& opt) {
  const model_config& c = config();
  std::vector<float> cos, sin;
  if (!opt.keep_activations) saved_.clear();
  tensor h = run(ids, B, T, nullptr, opt.keep_activations ? &saved_ : nullptr, nullptr, nullptr, &cos, &sin);
  const int64_t N = B * T;
  std::vector<float> losses(static_cast<size_t>(N));
  kc::classifier_forward_backward(losses.data(), nullptr, nullptr, h.data<float>(),
                                  w_->lm_head_or_embed().data<float>(), targets, N, c.hidden, c.vocab_size, 1.0f);
  int64_t n_valid = 0;
  double sum = 0.0;
  for (int64_t n = 0; n < N; ++n)
    if (targets[n] >= 0) {
      ++n_valid;
      sum += losses[static_cast<size_t>(n)];
    }
  const double denom = denominator(opt, n_valid, "forward_loss");
  return denom > 0 ? static_cast<float>(sum / denom) : 0.0f;
}

float decoder::forward_backward(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T,
                                model_weights& grads) {
  return forward_backward(ids, targets, B, T, grads, fb_options{});
}

float decoder::forward_backward(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T,
                                model_weights& grads, const fb_options& opt) {
  if (opt.arena == nullptr) return forward_backward_step(ids, targets, B, T, grads, opt);
  // Every tensor of the step comes from the arena and is gone when the step ends.
  saved_.clear();
  opt.arena->begin_step();
  float loss = 0.0f;
  try {
    runtime::allocator_scope scope(*opt.arena);
    loss = forward_backward_step(ids, targets, B, T, grads, opt);
    saved_.clear();
  } catch (...) {
    saved_.clear();
    opt.arena->end_step();
    throw;
  }
  opt.arena->end_step();
  return loss;
}

float decoder::forward_backward_step(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T,
                                     model_weights& grads, const fb_options& opt) {
  const model_config& c = config();
  TROUPE_CHECK(grads.layers.size() == w_->layers.size() && grads.embed.defined() &&
                   grads.embed.shape() == w_->embed.shape() &&
                   grads.config().tie_word_embeddings == c.tie_word_embeddings,
               errc::invalid_argument,
               "forward_backward: the gradient set does not mirror the weights (use model_weights::zeros_like)");
  const int64_t N = B * T, C = c.hidden, V = c.vocab_size;
  int64_t n_valid = 0;
  for (int64_t n = 0; n < N; ++n) n_valid += targets[n] >= 0 ? 1 : 0;
  const double denom = denominator(opt, n_valid, "forward_backward");
  const auto ready = [&](int64_t group) {
    if (opt.grads_ready) opt.grads_ready(group);
  };
  std::vector<float> cos, sin;
  tensor x_final, rstd_final;
  tensor h = run(ids, B, T, nullptr, &saved_, &x_final, &rstd_final, &cos, &sin, opt.memo, opt.arena);
  if (n_valid == 0 && cp_ == nullptr) {  // every target ignored: no loss, no gradient
    ready(grad_group::head);
    for (int64_t l = c.n_layers - 1; l >= 0; --l) ready(l);
    ready(grad_group::embedding);
    if (opt.memo) opt.memo->end_backward();
    return 0.0f;
  }
  // (Under CP a rank without valid targets still runs backward: its k/v feed the others' losses.)
  const float grad_scale = denom > 0 ? 1.0f / static_cast<float>(denom) : 0.0f;
  runtime::work_buffer losses(static_cast<size_t>(N));
  // LM head + cross-entropy, fused and chunked: dh = dloss/dh, dW_head += ...
  runtime::work_buffer dh(static_cast<size_t>(N * C));
  kc::classifier_forward_backward(losses.data(), dh.data(), grads.lm_head_or_embed().data<float>(), h.data<float>(),
                                  w_->lm_head_or_embed().data<float>(), targets, N, C, V, grad_scale);
  double sum = 0.0;
  for (int64_t n = 0; n < N; ++n)
    if (targets[n] >= 0) sum += losses[static_cast<size_t>(n)];
  // Final norm, then the layers in reverse, then the embedding.
  runtime::work_buffer dx(dh.size());
  kc::rmsnorm_backward(dx.data(), grads.final_norm.data<float>(), dh.data(), x_final.data<float>(),
                       w_->final_norm.data<float>(), rstd_final.data<float>(), N, C);
  ready(grad_group::head);
  const int64_t rotary_dim = static_cast<int64_t>(cos.size() / static_cast<size_t>(T)) * 2;
  const attention_geom g = geom(B, T, rotary_dim);
  if (opt.memo) opt.memo->begin_backward();
  for (int64_t l = c.n_layers - 1; l >= 0; --l) {
    const auto ul = static_cast<size_t>(l);
    if (opt.memo) opt.memo->before_backward(l, saved_[ul], w_->layers[ul], c, g, cos.data(), sin.data());
    if (opt.arena) opt.arena->mark(memo::step_phase::backward_begin, l);
    layer_backward(dx.data(), grads.layers[ul], saved_[ul], w_->layers[ul], c, g, cos.data(), sin.data(), l, moe_);
    if (opt.arena) opt.arena->mark(memo::step_phase::backward_end, l);
    if (opt.memo) opt.memo->after_backward(l, saved_[ul]);
    if (opt.arena) saved_[ul] = layer_activations{};  // its backward is done
    ready(l);
  }
  if (opt.memo) opt.memo->end_backward();
  kc::embedding_backward(grads.embed.data<float>(), dx.data(), ids, N, C, V);
  ready(grad_group::embedding);
  return denom > 0 ? static_cast<float>(sum / denom) : 0.0f;
}

std::vector<int32_t> shift_targets(const std::vector<int32_t>& ids, int64_t B, int64_t T) {
  TROUPE_CHECK(static_cast<int64_t>(ids.size()) == B * T, errc::invalid_argument,
               "shift_targets: {} ids for (B={}, T={})", ids.size(), B, T);
  std::vector<int32_t> t(ids.size(), -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i + 1 < T; ++i) t[static_cast<size_t>(b * T + i)] = ids[static_cast<size_t>(b * T + i + 1)];
  return t;
}

}  // namespace troupe::parallel
