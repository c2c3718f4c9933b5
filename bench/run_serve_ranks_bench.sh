#!/usr/bin/env bash
# `troupe serve` on 1 rank x 2 threads vs 2 expert-parallel ranks x 1 thread, with data-parallel
# attention (each rank its own requests and KV cache) and with attention replicated: the same
# Mooncake window through HTTP (bench/loadgen --url), one server after the other. Needs a build in
# build/ (targets troupe, troupe-launch, loadgen); makes /tmp/lg-tiny-mixtral (troupe init --preset
# tiny-mixtral).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f /tmp/lg-tiny-mixtral/config.json ] || build/launch/troupe init /tmp/lg-tiny-mixtral --preset tiny-mixtral >/dev/null
run() {  # run NAME RANKS THREADS [ATTENTION]
  printf 'model: /tmp/lg-tiny-mixtral\nserver: {port: 0}\nengine: {ranks: %s, block_size: 16, kv_cache_memory: 16MiB, %s, attention: %s}\n' \
    "$2" "max_batch_tokens: 64" "${4:-data_parallel}" > /tmp/sb.yaml
  if [ "$2" -gt 1 ]; then
    TROUPE_NUM_THREADS=$3 build/launch/troupe-launch -n "$2" -- build/launch/troupe serve /tmp/sb.yaml > /tmp/sb-$1.log 2>&1 &
  else
    TROUPE_NUM_THREADS=$3 build/launch/troupe serve /tmp/sb.yaml > /tmp/sb-$1.log 2>&1 &
  fi
  pid=$!
  port=""
  for _ in $(seq 1 200); do
    port=$(sed -n 's/^\(\[rank 0\] \)\{0,1\}troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\2/p' /tmp/sb-$1.log)
    [ -n "$port" ] && break; sleep 0.1
  done
  echo "=== $1: $2 rank(s) x $3 thread(s), ${4:-data_parallel} attention, port $port"
  build/bench/loadgen --model /tmp/lg-tiny-mixtral --url "http://127.0.0.1:$port" --skip 1000 --requests 150 \
    --block-tokens 16 --time-scale 0.05 --output-scale 4 2>&1 | grep -E "^\| |continuous|check"
  kill -TERM $pid; wait $pid 2>/dev/null
}
run one 1 2
run two-dp 2 1 data_parallel
run two-replicated 2 1 replicated
