// `troupe init MODEL_DIR --preset tiny-llama [--seed S]`: writes a randomly initialised
// checkpoint (config.json + model.safetensors) that every other command can read.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <string>

#include "launch/commands.h"
#include "parallel/model/model_presets.h"
#include "parallel/model/model_weights.h"
#include "runtime/io/hf_config.h"
#include "runtime/log.h"

namespace troupe::launch {

void register_init(CLI::App& app) {
  struct opts {
    std::string dir, preset = "tiny-llama", config;
    uint64_t seed = 1234;
  };
  auto o = std::make_shared<opts>();
  auto* cmd = app.add_subcommand("init", "Write a randomly initialised model checkpoint (config.json + model.safetensors)");
  cmd->add_option("MODEL_DIR", o->dir, "Directory to write (created if needed; an existing checkpoint is replaced)")
      ->required();
  cmd->add_option("--preset", o->preset,
                  fmt::format("Model preset: {}", fmt::join(parallel::model_preset_names(), ", ")))
      ->capture_default_str();
  cmd->add_option("--config", o->config,
                  "an HF config.json whose shape to use instead of a preset (e.g. a benchmark's larger model)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--seed", o->seed, "Random seed of the initialisation")->capture_default_str();
  cmd->callback([o] {
    const runtime::model_config c =
        o->config.empty() ? parallel::model_preset(o->preset) : runtime::load_hf_config(o->config);
    if (std::filesystem::exists(std::filesystem::path(o->dir) / "model.safetensors"))
      runtime::log::warn("{}: replacing the existing checkpoint", o->dir);
    const parallel::model_weights w = parallel::model_weights::random_init(c, o->seed);
    w.save(o->dir);
    fmt::print("wrote {} ({} {}, {} parameters, seed {})\n", o->dir, o->config.empty() ? o->preset : o->config,
               runtime::model_family_name(c.family), w.parameter_count(), o->seed);
  });
}

}  // namespace troupe::launch
