// parallel/model/model_presets.h — the small models troupe makes itself (`troupe init`),
// as HF config.json text parsed by the real loader, so they round-trip like any checkpoint.
//
//   model_config c = model_preset("tiny-llama");
//   model_weights::random_init(c, /*seed=*/1234).save("out/tiny-llama");
//
// Invariants:
//   1. Names: tiny-llama (vocab 256, hidden 128, 4 layers, 8 heads, 2 KV heads,
//      intermediate 384, llama3 RoPE scaling), tiny-mixtral (4 experts, top-2),
//      tiny-qwen2-moe (8 experts, top-2, shared expert with sigmoid gate).
//   2. An unknown name throws errc::invalid_argument listing the known ones.
#pragma once
#include <string>
#include <vector>

#include "runtime/io/hf_config.h"

namespace troupe::parallel {

const std::vector<std::string>& model_preset_names();
runtime::model_config model_preset(const std::string& name);

}  // namespace troupe::parallel
