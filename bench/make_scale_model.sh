#!/usr/bin/env bash
# Makes the elastic-serving benchmarks' model in DIR (if not there): a 212 M-parameter Mixtral shape
# with random weights (4 layers, hidden 1024, 8 experts of 1024 x 2048, top-2, the byte vocabulary;
# 850 MB of f32). Used by run_scale_bench.sh, run_scale_timeline.sh, run_kill_recovery.sh,
# run_serve_weak_scaling.sh.
#   bench/make_scale_model.sh DIR
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="$1"
[ -f "$dir/config.json" ] && exit 0
mkdir -p "$dir"
cat >"$dir.shape.json" <<'JSON'
{"model_type": "mixtral", "vocab_size": 256, "hidden_size": 1024, "intermediate_size": 2048,
 "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
 "max_position_embeddings": 4096, "rope_theta": 1000000.0, "num_local_experts": 8,
 "num_experts_per_tok": 2, "sliding_window": null, "tie_word_embeddings": false,
 "bos_token_id": 1, "eos_token_id": 2}
JSON
build/launch/troupe init "$dir" --config "$dir.shape.json"
