// parallel/train/checkpoint.h — training checkpoints: model, AdamW moments and trainer
// state in one directory per step, written atomically, loadable by HF transformers.
//
//   save_checkpoint("ckpt", step, w, m, v, {{"data_position", pos}, {"rng", rng}}, /*keep=*/3);
//   std::string dir = latest_checkpoint("ckpt");          // "ckpt/step-00000123", or ""
//   checkpoint_contents c = load_checkpoint("ckpt");      // a root or a step dir
//   model_weights w = model_weights::load(dir);           // model only (fine-tuning)
//   // python: AutoModelForCausalLM.from_pretrained("ckpt/step-00000123")
//
// Layout: <root>/step-00000123/{config.json, model.safetensors (f32, HF names),
// optimizer.safetensors ("exp_avg.<name>", "exp_avg_sq.<name>", f32), trainer_state.json
// (pretty JSON, "step" plus whatever the trainer put there)}; <root>/latest names the
// newest dir ("step-00000123\n").
//
// Invariants:
//   1. A step-* dir is complete or absent: it is written as <root>/.tmp-step-N-<pid>
//      (each file fsync'ed, then the dir) and renamed into place; an existing dir of that
//      name is swapped out only once the new one is complete. `latest` is replaced by
//      write + fsync + rename. Pruned dirs are renamed to .tmp-* before they are deleted.
//   2. One writer per root: save removes every .tmp-* entry it finds (leftovers of
//      crashed saves or prunes) before it writes.
//   3. keep > 0 keeps the dir just written plus the newest (by step) others, keep in all;
//      keep == 0 keeps everything.
//   4. latest_checkpoint follows `latest` when it names a complete dir, else falls back to
//      the newest complete step-* dir. Complete = all four files present, both
//      safetensors headers valid for their file size, trainer_state.json's step equal to
//      the dir's.
//   5. load_checkpoint validates everything (shapes, the exact optimizer tensor set, the
//      state's step) before returning; errors are errc::not_found / errc::format naming the
//      file and the tensor or key. Nothing partial is returned.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "parallel/model/model_weights.h"

namespace troupe::parallel {

struct checkpoint_contents {
  std::string dir;            // the checkpoint directory that was loaded
  int64_t step = 0;
  model_weights weights;      // config.json + model.safetensors (HF format, loadable by transformers)
  model_weights exp_avg;      // AdamW first moment, same names/shapes as weights
  model_weights exp_avg_sq;   // second moment
  nlohmann::json state;       // trainer_state.json, opaque here except "step" (data position, RNG, spec...)
};

// "step-00000123"
std::string checkpoint_dir_name(int64_t step);

// Writes <root>/step-<step> (see the invariants) and returns its path. state["step"] is set to
// step. exp_avg / exp_avg_sq must have the names and shapes of weights (errc::invalid_argument).
std::string save_checkpoint(const std::string& root, int64_t step, const model_weights& weights,
                            const model_weights& exp_avg, const model_weights& exp_avg_sq, nlohmann::json state,
                            int64_t keep);

// path: a checkpoint dir (it holds config.json or trainer_state.json), or a root (follows
// latest_checkpoint). errc::not_found when a root holds no complete checkpoint.
checkpoint_contents load_checkpoint(const std::string& path);

// The newest complete checkpoint dir under root; "" when there is none (or no root).
std::string latest_checkpoint(const std::string& root);

}  // namespace troupe::parallel
