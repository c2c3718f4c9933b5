// parallel/model/model_weights.h — the parameter set of a decoder model (Llama, Mistral,
// Mixtral, Qwen2-MoE), with HF's canonical tensor names, held as f32 cpu tensors.
//
//   model_weights w = model_weights::load("ckpt_dir");          // config.json + safetensors
//   model_weights g = model_weights::zeros_like(w);             // a gradient set
//   for (auto& p : w.parameters()) fmt::print("{} {}\n", p.name, p.value.describe());
//   model_weights r = model_weights::random_init(cfg, /*seed=*/1);
//   r.save("out_dir");                                          // atomic per file
//
// Invariants:
//   1. parameters() yields (canonical HF name, tensor&) in one fixed order: embedding,
//      then per layer: input_layernorm, q/k/v/o (weight, bias), post_attention_layernorm,
//      dense MLP or router, experts (e ascending), shared expert, shared_expert_gate;
//      then model.norm, lm_head. Two sets of the same config list the same names/shapes.
//   2. Optional tensors (biases, lm_head when tied, the unused MLP kind) are undefined
//      tensors and are not parameters. Tied embeddings: lm_head() returns embed.
//   3. Every parameter is a contiguous f32 cpu tensor owning its storage; code writes
//      into parameters in place and never rebinds the handles.
//   5. A shard (expert parallelism: parallel/ep/ep_shard.h) leaves the experts this rank does not
//      own undefined; parameters() then lists only what the rank holds, zeros_like() mirrors
//      the shard, and complete() is false (save() refuses it).
//   4. load() reads any float dtype, checks every shape, and throws errc::not_found
//      naming the tensor and the directory when one is missing, errc::format naming the
//      tensor, expected and found shapes when one is misshaped. Nothing is returned on error.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/io/hf_config.h"
#include "runtime/tensor.h"

namespace troupe::parallel {

using runtime::model_config;

// One decoder layer's tensors. Shapes use C = hidden, QD = n_heads*head_dim,
// KVD = n_kv_heads*head_dim, I = intermediate, E = experts, Im = moe_intermediate,
// Is = shared_expert_intermediate.
struct layer_params {
  bool is_moe = false;
  runtime::tensor input_norm;            // (C)
  runtime::tensor q_w, k_w, v_w, o_w;    // (QD, C), (KVD, C), (KVD, C), (C, QD)
  runtime::tensor q_b, k_b, v_b, o_b;    // (QD), (KVD), (KVD), (C); undefined when absent
  runtime::tensor post_norm;             // (C)
  // dense SwiGLU MLP (undefined in an MoE layer)
  runtime::tensor gate_w, up_w, down_w;  // (I, C), (I, C), (C, I)
  // MoE (undefined in a dense layer)
  runtime::tensor router_w;                                          // (E, C)
  std::vector<runtime::tensor> expert_gate, expert_up, expert_down;  // E x (Im, C), (Im, C), (C, Im)
  runtime::tensor shared_gate_w, shared_up_w, shared_down_w;         // (Is, C), (Is, C), (C, Is)
  runtime::tensor shared_expert_gate;                                // (1, C)
};

struct param_ref {
  const std::string name;
  runtime::tensor& value;
};

class model_weights {
 public:
  model_weights() = default;

  // All parameters of `c`, zero-filled (norm weights too).
  static model_weights allocate(const model_config& c);
  // Only the parameters `keep` names, zero-filled (or, with zero_fill false, left uninitialised:
  // storage to be overwritten or replaced, whose pages are not touched); the others undefined (a shard:
  // invariant 5).
  static model_weights allocate(const model_config& c, const std::function<bool(const std::string&)>& keep,
                                bool zero_fill = true);
  // Seeded normal(0, std) for matrices, 1 for norm weights, 0 for biases (HF's init).
  static model_weights random_init(const model_config& c, uint64_t seed, float std = 0.02f);
  static model_weights load(const std::string& dir);
  // A set with the same names/shapes, all zeros (for gradients).
  static model_weights zeros_like(const model_weights& w);
  // The (name, shape) list of a config's parameters, in parameters() order (no storage).
  static std::vector<std::pair<std::string, runtime::shape_t>> specs(const model_config& c);

  // Writes dir/config.json and dir/model.safetensors (f32), each atomically; creates dir.
  void save(const std::string& dir) const;

  const model_config& config() const { return config_; }
  // Context extension: new RoPE settings and context length (shapes do not change, so the
  // parameters stay valid). The next save() writes them to config.json.
  void set_rope(const runtime::rope_config& rope, int64_t max_position_embeddings);
  std::vector<param_ref> parameters();
  std::vector<std::pair<std::string, runtime::tensor>> parameters() const;  // handles share storage
  int64_t parameter_count() const;        // of the tensors held (a shard: this rank's)
  bool complete() const;                  // every parameter of the config is held (not a shard)
  void zero_();

  // lm_head, or the embedding when tied.
  const runtime::tensor& lm_head_or_embed() const { return config_.tie_word_embeddings ? embed : lm_head; }
  runtime::tensor& lm_head_or_embed() { return config_.tie_word_embeddings ? embed : lm_head; }

  runtime::tensor embed;       // (V, C)
  std::vector<layer_params> layers;
  runtime::tensor final_norm;  // (C)
  runtime::tensor lm_head;     // (V, C); undefined when tied

 private:
  using visit_fn = std::function<void(const std::string& name, runtime::tensor& t, const runtime::shape_t& shape)>;
  // Walks every parameter slot in the fixed order, with its expected shape.
  void visit(const visit_fn& f);
  void init_layout(const model_config& c);
  model_config config_;
};

// A nullable float pointer to a tensor's data (nullptr when the tensor is undefined).
inline float* fptr(const runtime::tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

}  // namespace troupe::parallel
