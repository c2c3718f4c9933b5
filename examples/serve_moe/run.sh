#!/usr/bin/env bash
# Starts `troupe serve` with examples/serve_moe/serve.yaml on two expert-parallel ranks (troupe-launch),
# sends a few requests with curl, prints the answers and stops the server (SIGTERM to the launcher). Serves the checkpoint of examples/train_moe_expert_parallel when that
# example has run (an MoE that learned some Shakespeare), else a new random tiny Mixtral.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
troupe="${TROUPE:-build/launch/troupe}"
launch="$(dirname "$troupe")/troupe-launch"
[ -x "$troupe" ] && [ -x "$launch" ] || { echo "build troupe first (scripts/quickstart or scripts/test)"; exit 1; }
mkdir -p runs/serve_moe
trained=runs/train_moe_expert_parallel/checkpoints
if [ -f "$trained/latest" ]; then
  rm -rf runs/serve_moe/model
  cp -r "$trained/$(cat "$trained/latest")" runs/serve_moe/model
  echo "serving the MoE trained by examples/train_moe_expert_parallel ($(cat "$trained/latest"))"
elif [ ! -f runs/serve_moe/model/config.json ]; then
  "$troupe" init runs/serve_moe/model --preset tiny-mixtral >/dev/null
  echo "serving a new random tiny Mixtral (run examples/train_moe_expert_parallel first for a trained one)"
fi
port="${PORT:-8000}"
TROUPE_NUM_THREADS="${TROUPE_NUM_THREADS:-1}" "$launch" -n 2 -- \
  "$troupe" serve examples/serve_moe/serve.yaml --set server.port="$port" >runs/serve_moe/server.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q "troupe serve: .* on http" runs/serve_moe/server.log && break; sleep 0.1; done
grep "troupe serve:" runs/serve_moe/server.log || { cat runs/serve_moe/server.log; exit 1; }
url="http://127.0.0.1:$port"
ask() {
  echo; echo "\$ curl $url$1 -d '$2'"
  curl -s "$url$1" -H 'Content-Type: application/json' -d "$2"
  echo
}
ask /v1/completions '{"prompt": "ROMEO:\nBut soft, what light", "max_tokens": 48, "temperature": 0}'
ask /v1/completions '{"prompt": "KING HENRY:\n", "max_tokens": 48, "temperature": 0.8, "top_p": 0.95, "seed": 7}'
ask /v1/chat/completions '{"messages": [{"role": "user", "content": "Speak, friend."}], "max_tokens": 32, "seed": 1}'
ask /v1/completions '{"prompt": "HAMLET:", "max_tokens": 6, "n": 2, "seed": 3, "logprobs": 1}'
ask /v1/completions '{"prompt": "x", "model": "gpt-4o"}'
echo; echo "\$ curl -N $url/v1/completions (stream)"
curl -sN "$url/v1/completions" -d '{"prompt": "JULIET:\n", "max_tokens": 16, "stream": true, "temperature": 0}'
echo; echo "\$ curl $url/metrics | grep troupe_"
curl -s "$url/metrics" | grep -E "^troupe_(engine_ranks|requests|kv_cache_usage|prefix_cache_hit_rate|generation_tokens_total|time_to_first_token_seconds_(sum|count)|expert_load_rows_total\{layer=\"0\"|expert_rank)"
kill "$pid"; wait "$pid" 2>/dev/null || true
grep -E "troupe serve: stopped|exited" runs/serve_moe/server.log
