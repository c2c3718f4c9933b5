#!/usr/bin/env bash
# Weak scaling of data-parallel attention on a model whose weights matter: the 212 M-parameter
# Mixtral of bench/run_scale_bench.sh served on 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1
# thread (data-parallel attention, expert-parallel MoE, LLEP), one server after the other, each driven
# by the same Mooncake window through HTTP (bench/loadgen --url). Prints loadgen's table per server.
# The figures: 2x1 / 1x1 output tok/s (the goal: >= 0.9 x 2) and 2x1 / 1x2.
#   bench/run_serve_weak_scaling.sh [WORK_DIR]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${1:-/tmp/troupe-scale-bench}"
mkdir -p "$work"
model="$work/model"
bench/make_scale_model.sh "$model" || exit 1
run() {  # run NAME RANKS THREADS
  printf 'model: %s\nserver: {port: 0}\nengine: {ranks: %s, block_size: 16, kv_cache_memory: 128MiB, max_batch_tokens: 256}\nexpert: {mode: llep}\n' \
    "$model" "$2" >"$work/weak.yaml"
  if [ "$2" -gt 1 ]; then
    TROUPE_NUM_THREADS=$3 build/launch/troupe-launch -n "$2" -- build/launch/troupe serve "$work/weak.yaml" >"$work/weak-$1.log" 2>&1 &
  else
    TROUPE_NUM_THREADS=$3 build/launch/troupe serve "$work/weak.yaml" >"$work/weak-$1.log" 2>&1 &
  fi
  pid=$!
  port=""
  for _ in $(seq 1 600); do
    port=$(sed -n 's/^\(\[rank 0\] \)\{0,1\}troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\2/p' "$work/weak-$1.log")
    [ -n "$port" ] && break; sleep 0.1
  done
  echo "=== $1: $2 rank(s) x $3 thread(s)"
  build/bench/loadgen --model "$model" --url "http://127.0.0.1:$port" --skip 1000 --requests 48 --block-tokens 2 \
    --time-scale 0.001 --output-scale 16 --max-output 32 2>&1 | grep -E "^\| |check"
  kill -TERM $pid; wait $pid 2>/dev/null
}
run 1x1 1 1
run 1x2 1 2
run 2x1 2 1
