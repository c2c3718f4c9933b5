// parallel/model/model_weights.cpp — the parameter layout per family, load/save/init.
#include "parallel/model/model_weights.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "runtime/io/safetensors.h"
#include "runtime/log.h"

namespace troupe::parallel {

using runtime::errc;
using runtime::model_family;
using runtime::shape_t;
using runtime::tensor;

namespace {

// Names of the MoE pieces differ between Mixtral and Qwen2-MoE.
struct moe_names {
  std::string router;                 // relative to "model.layers.{i}."
  std::string expert_prefix;          // + "{e}."
  std::string gate, up, down;         // expert projection names (+ ".weight")
};

moe_names moe_names_for(model_family f) {
  if (f == model_family::mixtral) return {"block_sparse_moe.gate", "block_sparse_moe.experts.", "w1", "w3", "w2"};
  return {"mlp.gate", "mlp.experts.", "gate_proj", "up_proj", "down_proj"};
}

}  // namespace

void model_weights::init_layout(const model_config& c) {
  TROUPE_CHECK(c.vocab_size > 0 && c.hidden > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 &&
                   c.head_dim > 0,
               errc::invalid_argument,
               "model config: vocab_size {}, hidden {}, layers {}, heads {}, kv heads {}, head_dim {} must all be > 0",
               c.vocab_size, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
  TROUPE_CHECK(c.n_heads % c.n_kv_heads == 0, errc::invalid_argument,
               "model config: n_heads {} must be a multiple of n_kv_heads {}", c.n_heads, c.n_kv_heads);
  config_ = c;
  layers.assign(static_cast<size_t>(c.n_layers), layer_params{});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    auto& L = layers[static_cast<size_t>(l)];
    L.is_moe = c.is_moe() && c.layer_is_moe(l);
    if (L.is_moe) {
      TROUPE_CHECK(c.top_k > 0 && c.top_k <= c.n_experts && c.moe_intermediate > 0, errc::invalid_argument,
                   "model config: MoE layer {} needs 0 < top_k ({}) <= n_experts ({}) and moe_intermediate > 0 ({})",
                   l, c.top_k, c.n_experts, c.moe_intermediate);
      L.expert_gate.resize(static_cast<size_t>(c.n_experts));
      L.expert_up.resize(static_cast<size_t>(c.n_experts));
      L.expert_down.resize(static_cast<size_t>(c.n_experts));
    } else {
      TROUPE_CHECK(c.intermediate > 0, errc::invalid_argument,
                   "model config: dense layer {} needs intermediate_size > 0", l);
    }
  }
}

void model_weights::visit(const visit_fn& f) {
  const model_config& c = config_;
  const int64_t C = c.hidden, QD = c.n_heads * c.head_dim, KVD = c.n_kv_heads * c.head_dim;
  const moe_names mn = moe_names_for(c.family);
  f("model.embed_tokens.weight", embed, {c.vocab_size, C});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    auto& L = layers[static_cast<size_t>(l)];
    const std::string p = fmt::format("model.layers.{}.", l);
    f(p + "input_layernorm.weight", L.input_norm, {C});
    f(p + "self_attn.q_proj.weight", L.q_w, {QD, C});
    if (c.attention_bias) f(p + "self_attn.q_proj.bias", L.q_b, {QD});
    f(p + "self_attn.k_proj.weight", L.k_w, {KVD, C});
    if (c.attention_bias) f(p + "self_attn.k_proj.bias", L.k_b, {KVD});
    f(p + "self_attn.v_proj.weight", L.v_w, {KVD, C});
    if (c.attention_bias) f(p + "self_attn.v_proj.bias", L.v_b, {KVD});
    f(p + "self_attn.o_proj.weight", L.o_w, {C, QD});
    if (c.o_proj_bias) f(p + "self_attn.o_proj.bias", L.o_b, {C});
    f(p + "post_attention_layernorm.weight", L.post_norm, {C});
    if (!L.is_moe) {
      const int64_t I = c.intermediate;
      f(p + "mlp.gate_proj.weight", L.gate_w, {I, C});
      f(p + "mlp.up_proj.weight", L.up_w, {I, C});
      f(p + "mlp.down_proj.weight", L.down_w, {C, I});
      continue;
    }
    const int64_t Im = c.moe_intermediate;
    f(p + mn.router + ".weight", L.router_w, {c.n_experts, C});
    for (int64_t e = 0; e < c.n_experts; ++e) {
      const std::string pe = fmt::format("{}{}{}.", p, mn.expert_prefix, e);
      const auto ue = static_cast<size_t>(e);
      f(pe + mn.gate + ".weight", L.expert_gate[ue], {Im, C});
      f(pe + mn.up + ".weight", L.expert_up[ue], {Im, C});
      f(pe + mn.down + ".weight", L.expert_down[ue], {C, Im});
    }
    if (c.shared_expert_intermediate > 0) {
      const int64_t Is = c.shared_expert_intermediate;
      f(p + "mlp.shared_expert.gate_proj.weight", L.shared_gate_w, {Is, C});
      f(p + "mlp.shared_expert.up_proj.weight", L.shared_up_w, {Is, C});
      f(p + "mlp.shared_expert.down_proj.weight", L.shared_down_w, {C, Is});
      f(p + "mlp.shared_expert_gate.weight", L.shared_expert_gate, {1, C});
    }
  }
  f("model.norm.weight", final_norm, {C});
  if (!c.tie_word_embeddings) f("lm_head.weight", lm_head, {c.vocab_size, C});
}

std::vector<param_ref> model_weights::parameters() {
  std::vector<param_ref> out;
  visit([&](const std::string& name, tensor& t, const shape_t&) {
    if (t.defined()) out.push_back(param_ref{name, t});  // a shard skips what it does not hold
  });
  return out;
}

std::vector<std::pair<std::string, tensor>> model_weights::parameters() const {
  std::vector<std::pair<std::string, tensor>> out;
  const_cast<model_weights*>(this)->visit([&](const std::string& name, tensor& t, const shape_t&) {
    if (t.defined()) out.emplace_back(name, t);
  });
  return out;
}

bool model_weights::complete() const {
  bool all = true;
  const_cast<model_weights*>(this)->visit([&](const std::string&, tensor& t, const shape_t&) { all &= t.defined(); });
  return all;
}

int64_t model_weights::parameter_count() const {
  int64_t n = 0;
  for (const auto& [name, t] : parameters()) n += t.numel();
  return n;
}

void model_weights::zero_() {
  for (auto& p : parameters()) p.value.zero_();
}

model_weights model_weights::allocate(const model_config& c) {
  model_weights w;
  w.init_layout(c);
  w.visit([](const std::string&, tensor& t, const shape_t& shape) { t = tensor::zeros(shape); });
  return w;
}

model_weights model_weights::allocate(const model_config& c, const std::function<bool(const std::string&)>& keep,
                                     bool zero_fill) {
  model_weights w;
  w.init_layout(c);
  w.visit([&](const std::string& name, tensor& t, const shape_t& shape) {
    if (keep(name)) t = zero_fill ? tensor::zeros(shape) : tensor::empty(shape);
  });
  return w;
}

void model_weights::set_rope(const runtime::rope_config& rope, int64_t max_position_embeddings) {
  TROUPE_CHECK(max_position_embeddings > 0, runtime::errc::invalid_argument,
               "set_rope: max_position_embeddings {} must be > 0", max_position_embeddings);
  const int64_t head_dim = config_.head_dim;
  config_.rope = rope;
  config_.rope.head_dim = head_dim;
  config_.rope.max_position_embeddings = max_position_embeddings;
  config_.max_position_embeddings = max_position_embeddings;
}

model_weights model_weights::zeros_like(const model_weights& w) {
  model_weights z = allocate(w.config());
  if (w.complete()) return z;
  std::vector<bool> held;  // mirror a shard (invariant 5)
  const_cast<model_weights&>(w).visit([&](const std::string&, tensor& t, const shape_t&) { held.push_back(t.defined()); });
  size_t i = 0;
  z.visit([&](const std::string&, tensor& t, const shape_t&) {
    if (!held[i++]) t = tensor();
  });
  return z;
}

model_weights model_weights::random_init(const model_config& c, uint64_t seed, float std) {
  model_weights w = allocate(c);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std);
  w.visit([&](const std::string& name, tensor& t, const shape_t& shape) {
    float* p = t.data<float>();
    const int64_t n = t.numel();
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    if (is_norm) {
      for (int64_t i = 0; i < n; ++i) p[i] = 1.0f;
    } else if (shape.size() >= 2) {
      for (int64_t i = 0; i < n; ++i) p[i] = normal(rng);
    }  // biases stay 0
  });
  return w;
}

model_weights model_weights::load(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  TROUPE_CHECK(fs::exists(cfg_path), errc::not_found,
               "{}: no config.json; a model directory holds config.json and model.safetensors "
               "(make one with `troupe init DIR --preset tiny-llama`)",
               dir);
  model_weights w;
  w.init_layout(runtime::load_hf_config(cfg_path));
  runtime::safetensors_index idx = runtime::safetensors_index::open_dir(dir);
  std::set<std::string> used;
  w.visit([&](const std::string& name, tensor& t, const shape_t& shape) {
    TROUPE_CHECK(idx.contains(name), errc::not_found,
                 "checkpoint {}: tensor \"{}\" is missing (the config {} needs it); the file does not match config.json",
                 dir, name, runtime::model_family_name(w.config_.family));
    const auto& e = idx.entry(name);
    TROUPE_CHECK(e.shape == shape, errc::format, "checkpoint {}: tensor \"{}\" has shape {}, expected {} from config.json",
                 dir, name, runtime::shape_str(e.shape), runtime::shape_str(shape));
    TROUPE_CHECK(runtime::dtype_is_float(e.dtype), errc::format,
                 "checkpoint {}: tensor \"{}\" has dtype {}, expected a float type", dir, name,
                 runtime::dtype_name(e.dtype));
    t = idx.get_as(name, runtime::dtype::f32, shape).clone();
    used.insert(name);
  });
  int64_t unused = 0;
  for (const auto& n : idx.names())
    if (!used.count(n)) ++unused;
  if (unused > 0) runtime::log::debug("checkpoint {}: {} tensors not used by the model", dir, unused);
  return w;
}

void model_weights::save(const std::string& dir) const {
  namespace fs = std::filesystem;
  TROUPE_CHECK(complete(), errc::invalid_argument,
               "save {}: this is one rank's shard of the experts; gather the whole set first (ep_gather_weights)", dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  TROUPE_CHECK(!ec, errc::io, "save: cannot create directory {}: {}", dir, ec.message());
  runtime::safetensors_write((fs::path(dir) / "model.safetensors").string(), parameters(), {{"format", "pt"}});
  const std::string path = (fs::path(dir) / "config.json").string();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TROUPE_CHECK(out.good(), errc::io, "save: cannot write {}", tmp);
    out << runtime::hf_config_to_json(config_) << "\n";
    out.close();
    TROUPE_CHECK(out.good(), errc::io, "save: writing {} failed", tmp);
  }
  fs::rename(tmp, path, ec);
  TROUPE_CHECK(!ec, errc::io, "save: cannot rename {} to {}: {}", tmp, path, ec.message());
}

std::vector<std::pair<std::string, shape_t>> model_weights::specs(const model_config& c) {
  model_weights w;
  w.init_layout(c);
  std::vector<std::pair<std::string, shape_t>> out;
  w.visit([&](const std::string& name, tensor&, const shape_t& shape) { out.emplace_back(name, shape); });
  return out;
}

}  // namespace troupe::parallel
