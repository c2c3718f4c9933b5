// `troupe inspect MODEL_DIR`: the architecture from config.json and what the safetensors
// files hold (parameter count, bytes by dtype), checked against each other.
#include <fmt/format.h>

#include <filesystem>
#include <map>
#include <string>

#include "launch/commands.h"
#include "parallel/model/model_weights.h"
#include "runtime/io/safetensors.h"

namespace troupe::launch {

namespace {

const char* rope_type_name(runtime::rope_type t) {
  switch (t) {
    case runtime::rope_type::standard: return "default";
    case runtime::rope_type::linear: return "linear";
    case runtime::rope_type::dynamic: return "dynamic";
    case runtime::rope_type::yarn: return "yarn";
    case runtime::rope_type::llama3: return "llama3";
  }
  return "?";
}

std::string rope_line(const runtime::rope_config& r) {
  std::string s = fmt::format("{} (theta {:g}", rope_type_name(r.type), r.theta);
  switch (r.type) {
    case runtime::rope_type::standard: break;
    case runtime::rope_type::linear: s += fmt::format(", factor {:g}", r.factor); break;
    case runtime::rope_type::dynamic:
      s += fmt::format(", factor {:g}, max_position_embeddings {}", r.factor, r.max_position_embeddings);
      break;
    case runtime::rope_type::yarn:
      s += fmt::format(", factor {:g}, original_max_position_embeddings {}, beta_fast {:g}, beta_slow {:g}", r.factor,
                       r.original_max_position_embeddings, r.beta_fast, r.beta_slow);
      if (r.attention_factor > 0) s += fmt::format(", attention_factor {:g}", r.attention_factor);
      break;
    case runtime::rope_type::llama3:
      s += fmt::format(", factor {:g}, low_freq_factor {:g}, high_freq_factor {:g}, original_max_position_embeddings {}",
                       r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings);
      break;
  }
  if (r.partial_rotary_factor != 1.0) s += fmt::format(", partial_rotary_factor {:g}", r.partial_rotary_factor);
  return s + ")";
}

std::string human_bytes(size_t b) {
  if (b >= (size_t{1} << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1 << 30));
  if (b >= (size_t{1} << 20)) return fmt::format("{:.2f} MiB", static_cast<double>(b) / (1 << 20));
  if (b >= 1024) return fmt::format("{:.1f} KiB", static_cast<double>(b) / 1024);
  return fmt::format("{} B", b);
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("inspect", "Describe a model checkpoint (config.json + safetensors)");
  cmd->add_option("MODEL_DIR", *dir, "Checkpoint directory")->required();
  cmd->callback([dir] {
    const std::string cfg_path = (std::filesystem::path(*dir) / "config.json").string();
    TROUPE_CHECK(std::filesystem::exists(cfg_path), runtime::errc::not_found,
                 "{}: no config.json (a model directory holds config.json and model.safetensors)", *dir);
    const runtime::model_config c = runtime::load_hf_config(cfg_path);
    fmt::print("model:      {}\n", *dir);
    fmt::print("family:     {} (model_type \"{}\")\n", runtime::model_family_name(c.family), c.model_type);
    fmt::print("layers:     {}\n", c.n_layers);
    fmt::print("hidden:     {}\n", c.hidden);
    fmt::print("heads:      {} query, {} key/value, head_dim {}\n", c.n_heads, c.n_kv_heads, c.head_dim);
    fmt::print("vocab:      {}\n", c.vocab_size);
    fmt::print("rope:       {}\n", rope_line(c.rope));
    fmt::print("context:    max_position_embeddings {}{}\n", c.max_position_embeddings,
               c.sliding_window > 0 ? fmt::format(", sliding window {}", c.sliding_window) : std::string());
    fmt::print("attention:  q/k/v bias {}, o bias {}\n", c.attention_bias ? "yes" : "no", c.o_proj_bias ? "yes" : "no");
    if (c.is_moe()) {
      int64_t moe_layers = 0;
      for (int64_t l = 0; l < c.n_layers; ++l) moe_layers += c.layer_is_moe(l) ? 1 : 0;
      fmt::print("moe:        {} experts, top-{}, expert intermediate {}, normalized top-k {}, {} of {} layers sparse\n",
                 c.n_experts, c.top_k, c.moe_intermediate, c.norm_topk_prob ? "yes" : "no", moe_layers, c.n_layers);
      if (c.shared_expert_intermediate > 0)
        fmt::print("shared:     shared expert, intermediate {}, sigmoid gate\n", c.shared_expert_intermediate);
      if (moe_layers < c.n_layers) fmt::print("mlp:        dense intermediate {}\n", c.intermediate);
    } else {
      fmt::print("mlp:        dense SwiGLU, intermediate {}\n", c.intermediate);
    }
    fmt::print("embeddings: {}\n", c.tie_word_embeddings ? "tied (lm_head = embed_tokens)" : "untied");
    const auto specs = parallel::model_weights::specs(c);
    int64_t expected = 0;
    for (const auto& [name, shape] : specs) expected += runtime::shape_numel(shape);
    fmt::print("parameters: {} ({:.2f} M) from the config\n", expected, static_cast<double>(expected) / 1e6);

    const auto idx = runtime::safetensors_index::open_dir(*dir);
    std::map<std::string, size_t> bytes;
    int64_t in_file = 0;
    for (const auto& n : idx.names()) {
      const auto& e = idx.entry(n);
      bytes[runtime::dtype_name(e.dtype)] += e.end - e.begin;
      in_file += runtime::shape_numel(e.shape);
    }
    std::string by_dtype;
    for (const auto& [dt, b] : bytes) by_dtype += fmt::format("{}{} {}", by_dtype.empty() ? "" : ", ", dt, human_bytes(b));
    fmt::print("file:       {} tensors, {} elements; bytes by dtype: {}\n", idx.names().size(), in_file, by_dtype);
    int64_t missing = 0, misshaped = 0;
    std::string first_problem;
    for (const auto& [name, shape] : specs) {
      if (!idx.contains(name)) {
        if (missing++ == 0 && first_problem.empty()) first_problem = fmt::format("\"{}\" is missing", name);
      } else if (idx.entry(name).shape != shape) {
        if (misshaped++ == 0 && first_problem.empty())
          first_problem = fmt::format("\"{}\" has shape {}, expected {}", name,
                                      runtime::shape_str(idx.entry(name).shape), runtime::shape_str(shape));
      }
    }
    if (missing + misshaped == 0)
      fmt::print("check:      ok, every tensor the config needs is present with its shape\n");
    else
      fmt::print("check:      {} missing, {} misshaped tensors (first: {})\n", missing, misshaped, first_problem);
    TROUPE_CHECK(missing + misshaped == 0, runtime::errc::invalid_argument,
                 "{}: the checkpoint does not match its config.json ({} missing, {} misshaped tensors; first: {})",
                 *dir, missing, misshaped, first_problem);
  });
}

}  // namespace troupe::launch
