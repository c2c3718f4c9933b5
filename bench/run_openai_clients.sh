#!/usr/bin/env bash
# troupe serve under real OpenAI clients (tooling only, never CI): the official `openai` Python client and
# lm-evaluation-harness (`lm_eval --model local-completions`), every number checked against transformers.
#
#   bench/run_openai_clients.sh [WORK_DIR]      # default /tmp/troupe-openai-clients
#
# Makes a venv with torch, transformers, openai and lm_eval[api] (WORK_DIR/venv, once), a small Llama
# trained on tinyshakespeare with the ChatML BPE tokenizer of tests/fixtures/tokenizers/qwen2
# (bench/openai_clients.py make-model), a 100-document last-word loglikelihood task from the held-out
# text, then starts build/launch/troupe serve on a free port, runs the client checks and lm_eval, compares
# lm_eval's loglikelihoods with transformers', and stops the server.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/troupe-openai-clients}"
mkdir -p "$work"
if [ ! -x "$work/venv/bin/lm_eval" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q torch transformers openai "lm_eval[api]"
fi
py="$work/venv/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f "$work/model/config.json" ] || "$py" "$root/bench/openai_clients.py" make-model "$work/model"
"$py" "$root/bench/openai_clients.py" make-task "$work/tasks" 100
printf 'model: %s\nserved_model_name: tiny-shakespeare\nserver: {port: 0, max_tokens: 512}\nengine: {block_size: 16, kv_cache_memory: 64MiB}\n' \
  "$work/model" >"$work/serve.yaml"
"$root/build/launch/troupe" serve "$work/serve.yaml" >"$work/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
port=""
for _ in $(seq 1 200); do
  port=$(sed -n 's/^troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$work/server.log")
  [ -n "$port" ] && break; sleep 0.1
done
[ -n "$port" ] || { cat "$work/server.log"; exit 1; }
url="http://127.0.0.1:$port"
echo "== the openai client ($("$py" -c 'import openai; print(openai.__version__)'))"
"$py" "$root/bench/openai_clients.py" check-openai "$url" "$work/model" 2>&1 | grep -E '^(ok|Traceback|AssertionError)'
echo "== lm_eval $("$py" -c 'import lm_eval; print(lm_eval.__version__)') --model local-completions"
rm -rf "$work/lm_out"
"$work/venv/bin/lm_eval" --model local-completions \
  --model_args "model=tiny-shakespeare,base_url=$url/v1/completions,tokenizer=$work/model,tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,tokenized_requests=True" \
  --tasks shakespeare_lastword --include_path "$work/tasks" --log_samples --output_path "$work/lm_out" --batch_size 1 \
  2>&1 | grep -E '^\|'
"$py" "$root/bench/openai_clients.py" compare-lm-eval "$work/lm_out" "$work/model" "$url" 2>&1 | grep -E '^lm_eval|Error'
