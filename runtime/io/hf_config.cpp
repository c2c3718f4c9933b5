// runtime/io/hf_config.cpp — config.json (HF transformers 4.x and 5.x) -> model_config.
//
// Defaults follow the transformers config classes (LlamaConfig, MistralConfig,
// MixtralConfig, Qwen2MoeConfig): a missing key takes the class default, a JSON null
// takes what the class's __post_init__ derives (e.g. num_key_value_heads: null ->
// num_attention_heads). The RoPE block is rope_parameters (transformers 5) or
// rope_theta + rope_scaling (transformers 4); both are accepted.
#include "runtime/io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/error.h"

namespace troupe::runtime {

namespace {

using json = nlohmann::json;

struct family_defaults {
  int64_t max_position_embeddings;
  double rms_norm_eps;
  double rope_theta;
  int64_t n_kv_heads;  // when the key is absent (0 = num_attention_heads)
  int64_t sliding_window;
};

family_defaults defaults_for(model_family f) {
  switch (f) {
    case model_family::llama:
      return {2048, 1e-6, 10000.0, 0, 0};
    case model_family::mistral:
      return {4096 * 32, 1e-6, 10000.0, 8, 4096};
    case model_family::mixtral:
      return {4096 * 32, 1e-5, 1e6, 8, 0};
    case model_family::qwen2_moe:
      return {32768, 1e-6, 10000.0, 16, 0};
  }
  return {2048, 1e-6, 10000.0, 0, 0};
}

// Typed access to one JSON object with error messages that name the file and the key.
class reader {
 public:
  reader(const json& obj, std::string label, std::string prefix)
      : obj_(obj), label_(std::move(label)), prefix_(std::move(prefix)) {}

  bool has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }
  const json& raw(const char* key) const { return obj_.at(key); }

  [[noreturn]] void fail(const char* key, const std::string& what) const {
    TROUPE_THROW(errc::format, "{}: key \"{}{}\": {}", label_, prefix_, key, what);
  }
  void require(const char* key) const {
    if (!has(key)) fail(key, "missing required key; add it to config.json (see the model's HF config)");
  }

  int64_t get_int(const char* key, int64_t def) const {
    if (!has(key)) return def;
    const json& v = obj_.at(key);
    if (v.is_number_integer()) {
      if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        fail(key, "integer too large");
      return v.get<int64_t>();
    }
    if (v.is_number_float() && std::nearbyint(v.get<double>()) == v.get<double>() && std::abs(v.get<double>()) < 9e15)
      return static_cast<int64_t>(v.get<double>());
    fail(key, fmt::format("must be an integer, got {} {}", v.type_name(), v.dump()));
  }
  int64_t get_int_required(const char* key) const {
    require(key);
    return get_int(key, 0);
  }
  double get_double(const char* key, double def) const {
    if (!has(key)) return def;
    const json& v = obj_.at(key);
    if (!v.is_number()) fail(key, fmt::format("must be a number, got {} {}", v.type_name(), v.dump()));
    return v.get<double>();
  }
  bool get_bool(const char* key, bool def) const {
    if (!has(key)) return def;
    const json& v = obj_.at(key);
    if (!v.is_boolean()) fail(key, fmt::format("must be true or false, got {} {}", v.type_name(), v.dump()));
    return v.get<bool>();
  }
  std::string get_string(const char* key, const std::string& def) const {
    if (!has(key)) return def;
    const json& v = obj_.at(key);
    if (!v.is_string()) fail(key, fmt::format("must be a string, got {} {}", v.type_name(), v.dump()));
    return v.get<std::string>();
  }
  // An int, or a list of ints whose first element is taken (eos_token_id); `def` when
  // absent, -1 when null.
  int64_t get_token_id(const char* key, int64_t def) const {
    if (!obj_.contains(key)) return def;
    if (!has(key)) return -1;
    const json& v = obj_.at(key);
    if (v.is_array()) {
      if (v.empty()) return -1;
      if (!v[0].is_number_integer())
        fail(key, fmt::format("must be an integer or a list of integers, got {}", v.dump()));
      return v[0].get<int64_t>();
    }
    return get_int(key, -1);
  }
  void check(bool ok, const char* key, const std::string& what) const {
    if (!ok) fail(key, what);
  }

 private:
  const json& obj_;
  std::string label_;
  std::string prefix_;
};

void parse_rope(const reader& top, const json& root, const std::string& label, model_config& c, double default_theta) {
  rope_config& r = c.rope;
  r = rope_config{};
  r.head_dim = c.head_dim;
  r.max_position_embeddings = c.max_position_embeddings;
  r.theta = top.get_double("rope_theta", default_theta);
  r.partial_rotary_factor = top.get_double("partial_rotary_factor", 1.0);

  const char* block_key = nullptr;
  if (top.has("rope_parameters"))
    block_key = "rope_parameters";
  else if (top.has("rope_scaling"))
    block_key = "rope_scaling";
  if (block_key != nullptr) {
    const json& blk = root.at(block_key);
    if (!blk.is_object())
      top.fail(block_key, fmt::format("must be an object like {{\"rope_type\": \"linear\", \"factor\": 2.0}} or null, "
                                      "got {}",
                                      blk.type_name()));
    reader b(blk, label, std::string(block_key) + ".");
    std::string type = b.get_string("rope_type", b.get_string("type", "default"));
    if (type == "default")
      r.type = rope_type::standard;
    else if (type == "linear")
      r.type = rope_type::linear;
    else if (type == "dynamic")
      r.type = rope_type::dynamic;
    else if (type == "yarn")
      r.type = rope_type::yarn;
    else if (type == "llama3")
      r.type = rope_type::llama3;
    else
      b.fail("rope_type",
             fmt::format("\"{}\" is not supported; use one of default, linear, dynamic, yarn, llama3", type));
    r.theta = b.get_double("rope_theta", r.theta);
    r.partial_rotary_factor = b.get_double("partial_rotary_factor", r.partial_rotary_factor);
    if (r.type != rope_type::standard) {
      r.original_max_position_embeddings =
          b.get_int("original_max_position_embeddings", r.type == rope_type::dynamic ? 0 : c.max_position_embeddings);
      b.check(r.original_max_position_embeddings >= 0, "original_max_position_embeddings", "must be positive");
      if (r.type == rope_type::yarn && !b.has("factor")) {
        // transformers: factor = max_position_embeddings / original_max_position_embeddings
        b.check(r.original_max_position_embeddings > 0, "factor", "missing, and cannot be derived");
        r.factor =
            static_cast<double>(c.max_position_embeddings) / static_cast<double>(r.original_max_position_embeddings);
      } else {
        b.require("factor");
        r.factor = b.get_double("factor", 1.0);
      }
      b.check(r.factor > 0, "factor", fmt::format("{} must be > 0 (1.0 means no scaling)", r.factor));
    }
    if (r.type == rope_type::llama3) {
      b.require("low_freq_factor");
      b.require("high_freq_factor");
      r.low_freq_factor = b.get_double("low_freq_factor", 1.0);
      r.high_freq_factor = b.get_double("high_freq_factor", 4.0);
      b.check(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor, "high_freq_factor",
              fmt::format("llama3 needs 0 < low_freq_factor ({}) < high_freq_factor ({})", r.low_freq_factor,
                          r.high_freq_factor));
    }
    if (r.type == rope_type::yarn) {
      // transformers treats 0/null as "use the default" (beta_fast or 32).
      r.beta_fast = b.get_double("beta_fast", 0.0);
      r.beta_slow = b.get_double("beta_slow", 0.0);
      if (r.beta_fast == 0) r.beta_fast = 32.0;
      if (r.beta_slow == 0) r.beta_slow = 1.0;
      r.attention_factor = b.get_double("attention_factor", 0.0);
      r.mscale = b.get_double("mscale", 0.0);
      r.mscale_all_dim = b.get_double("mscale_all_dim", 0.0);
      b.check(r.attention_factor >= 0, "attention_factor", "must be >= 0");
      b.check(b.get_bool("truncate", true), "truncate", "false is not supported by troupe's yarn tables");
    }
  }
  top.check(r.theta > 0, "rope_theta", fmt::format("{} must be > 0", r.theta));
  top.check(r.partial_rotary_factor > 0 && r.partial_rotary_factor <= 1.0, "partial_rotary_factor",
            fmt::format("{} must be in (0, 1]", r.partial_rotary_factor));
}

}  // namespace

const char* model_family_name(model_family f) {
  switch (f) {
    case model_family::llama:
      return "llama";
    case model_family::mistral:
      return "mistral";
    case model_family::mixtral:
      return "mixtral";
    case model_family::qwen2_moe:
      return "qwen2_moe";
  }
  return "?";
}

bool model_config::layer_is_moe(int64_t layer) const {
  switch (family) {
    case model_family::llama:
    case model_family::mistral:
      return false;
    case model_family::mixtral:
      return n_experts > 0;
    case model_family::qwen2_moe:
      return std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) == mlp_only_layers.end() &&
             n_experts > 0 && decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
  }
  return false;
}

model_config parse_hf_config(const std::string& json_text, const std::string& label) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::parse_error& e) {
    TROUPE_THROW(errc::format, "{}: byte {}: malformed JSON ({})", label, e.byte, e.what());
  }
  TROUPE_CHECK(root.is_object(), errc::format, "{}: config.json must be a JSON object, got {}", label,
               root.type_name());
  reader top(root, label, "");
  model_config c;
  top.require("model_type");
  c.model_type = top.get_string("model_type", "");
  if (c.model_type == "llama")
    c.family = model_family::llama;
  else if (c.model_type == "mistral")
    c.family = model_family::mistral;
  else if (c.model_type == "mixtral")
    c.family = model_family::mixtral;
  else if (c.model_type == "qwen2_moe")
    c.family = model_family::qwen2_moe;
  else
    top.fail("model_type",
             fmt::format("\"{}\" is not supported; troupe reads llama, mistral, mixtral and qwen2_moe", c.model_type));
  const family_defaults d = defaults_for(c.family);

  c.vocab_size = top.get_int_required("vocab_size");
  c.hidden = top.get_int_required("hidden_size");
  c.intermediate = top.get_int_required("intermediate_size");
  c.n_layers = top.get_int_required("num_hidden_layers");
  c.n_heads = top.get_int_required("num_attention_heads");
  for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"})
    top.check(top.get_int(k, 0) > 0, k, fmt::format("{} must be a positive integer", top.raw(k).dump()));

  // num_key_value_heads: absent -> the class default; null -> num_attention_heads.
  if (top.has("num_key_value_heads"))
    c.n_kv_heads = top.get_int("num_key_value_heads", 0);
  else if (root.contains("num_key_value_heads") || d.n_kv_heads == 0)
    c.n_kv_heads = c.n_heads;
  else
    c.n_kv_heads = d.n_kv_heads;
  top.check(c.n_kv_heads > 0, "num_key_value_heads", fmt::format("{} must be positive", c.n_kv_heads));
  top.check(c.n_heads % c.n_kv_heads == 0, "num_key_value_heads",
            fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {} (grouped-query attention "
                        "needs whole groups)",
                        c.n_heads, c.n_kv_heads));
  if (top.has("head_dim")) {
    c.head_dim = top.get_int("head_dim", 0);
    top.check(c.head_dim > 0, "head_dim", fmt::format("{} must be positive", c.head_dim));
  } else {
    top.check(
        c.hidden % c.n_heads == 0, "hidden_size",
        fmt::format("{} is not divisible by num_attention_heads {}; set head_dim explicitly", c.hidden, c.n_heads));
    c.head_dim = c.hidden / c.n_heads;
  }

  c.max_position_embeddings = top.get_int("max_position_embeddings", d.max_position_embeddings);
  top.check(c.max_position_embeddings > 0, "max_position_embeddings", "must be positive");
  c.rms_norm_eps = top.get_double("rms_norm_eps", d.rms_norm_eps);
  top.check(c.rms_norm_eps > 0, "rms_norm_eps", fmt::format("{} must be > 0", c.rms_norm_eps));
  c.tie_word_embeddings = top.get_bool("tie_word_embeddings", false);
  // transformers: llama/mistral/mixtral default to bos 1, eos 2; qwen2_moe to None.
  const bool qwen = c.family == model_family::qwen2_moe;
  c.bos_token_id = top.get_token_id("bos_token_id", qwen ? -1 : 1);
  c.eos_token_id = top.get_token_id("eos_token_id", qwen ? -1 : 2);
  const std::string act = top.get_string("hidden_act", "silu");
  if (act != "silu")
    TROUPE_THROW(errc::unsupported, "{}: key \"hidden_act\": \"{}\" is not supported; troupe's MLP is SwiGLU (silu)",
                 label, act);

  switch (c.family) {
    case model_family::llama:
      c.attention_bias = c.o_proj_bias = top.get_bool("attention_bias", false);
      if (top.get_bool("mlp_bias", false))
        TROUPE_THROW(errc::unsupported, "{}: key \"mlp_bias\": true is not supported (troupe's MLP has no bias)",
                     label);
      break;
    case model_family::mistral:
    case model_family::mixtral:
      c.sliding_window = root.contains("sliding_window") ? top.get_int("sliding_window", 0) : d.sliding_window;
      top.check(c.sliding_window >= 0, "sliding_window", "must be >= 0 or null (no window)");
      break;
    case model_family::qwen2_moe:
      c.attention_bias = top.get_bool("qkv_bias", true);  // q/k/v carry a bias, o_proj does not
      c.o_proj_bias = false;
      if (top.get_bool("use_sliding_window", false))
        TROUPE_THROW(errc::unsupported,
                     "{}: key \"use_sliding_window\": true (per-layer windows) is not supported; set it to false",
                     label);
      break;
  }

  if (c.family == model_family::mixtral) {
    const char* ek = top.has("num_local_experts") ? "num_local_experts" : "num_experts";
    c.n_experts = top.get_int(ek, 8);
    c.top_k = top.get_int("num_experts_per_tok", 2);
    c.moe_intermediate = c.intermediate;
    c.norm_topk_prob = true;
    c.router_aux_loss_coef = top.get_double("router_aux_loss_coef", 0.001);
    top.check(c.n_experts > 0, ek, fmt::format("{} must be positive", c.n_experts));
  } else if (c.family == model_family::qwen2_moe) {
    c.n_experts = top.get_int("num_experts", 60);
    c.top_k = top.get_int("num_experts_per_tok", 4);
    c.moe_intermediate = top.get_int("moe_intermediate_size", 1408);
    c.shared_expert_intermediate = top.get_int("shared_expert_intermediate_size", 5632);
    c.norm_topk_prob = top.get_bool("norm_topk_prob", false);
    c.decoder_sparse_step = top.get_int("decoder_sparse_step", 1);
    c.router_aux_loss_coef = top.get_double("router_aux_loss_coef", 0.001);
    top.check(c.n_experts >= 0, "num_experts", fmt::format("{} must be >= 0", c.n_experts));
    top.check(c.shared_expert_intermediate >= 0, "shared_expert_intermediate_size", "must be >= 0 (0 = none)");
    top.check(c.decoder_sparse_step > 0, "decoder_sparse_step",
              fmt::format("{} must be >= 1 (every step-th layer is sparse)", c.decoder_sparse_step));
    if (top.has("mlp_only_layers")) {
      const json& v = top.raw("mlp_only_layers");
      top.check(v.is_array(), "mlp_only_layers", fmt::format("must be a list of layer indices, got {}", v.type_name()));
      for (const auto& x : v) {
        top.check(x.is_number_integer(), "mlp_only_layers", fmt::format("entry {} is not an integer", x.dump()));
        const int64_t l = x.get<int64_t>();
        top.check(l >= 0 && l < c.n_layers, "mlp_only_layers",
                  fmt::format("layer {} is outside [0, num_hidden_layers = {})", l, c.n_layers));
        c.mlp_only_layers.push_back(l);
      }
    }
  } else {
    c.norm_topk_prob = true;
  }
  if (c.n_experts > 0) {
    top.check(c.moe_intermediate > 0, c.family == model_family::mixtral ? "intermediate_size" : "moe_intermediate_size",
              fmt::format("{} must be positive", c.moe_intermediate));
    top.check(c.top_k >= 1 && c.top_k <= c.n_experts, "num_experts_per_tok",
              fmt::format("{} must be in [1, {}] (the number of experts)", c.top_k, c.n_experts));
  }

  parse_rope(top, root, label, c, d.rope_theta);
  return c;
}

model_config load_hf_config(const std::string& path_in) {
  namespace fs = std::filesystem;
  std::string path = path_in;
  std::error_code ec;
  if (fs::is_directory(path, ec)) path = (fs::path(path) / "config.json").string();
  TROUPE_CHECK(fs::exists(path, ec), errc::not_found, "{}: config file does not exist", path);
  std::ifstream in(path);
  TROUPE_CHECK(in.good(), errc::io, "{}: cannot read", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_hf_config(ss.str(), path);
}

}  // namespace troupe::runtime
