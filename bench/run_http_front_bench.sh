#!/usr/bin/env bash
# The HTTP front of `troupe serve` under 1,000 connections (bench/http_front_bench.cpp): /health latency
# and a new request's TTFT on a quiet server, then with 400 idle, 300 keep-alive and 300 never-reading
# streaming clients, in one run. Needs a build in build/ (targets troupe, http_front_bench); makes
# /tmp/lg-tiny-mixtral (troupe init --preset tiny-mixtral). Extra arguments go to the bench.
#
#   bench/run_http_front_bench.sh                          # the default load
#   bench/run_http_front_bench.sh --streams 100 --idle 100  # a smaller one
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f /tmp/lg-tiny-mixtral/config.json ] || build/launch/troupe init /tmp/lg-tiny-mixtral --preset tiny-mixtral >/dev/null
# Every stream is admitted at once (max_running above the streams), so the probes' TTFT is the
# engine's queueing behind one iteration of the running batch, not a wait for a free slot.
printf 'model: /tmp/lg-tiny-mixtral\nserver: {port: 0, max_tokens: 4096}\nengine: {block_size: 16, kv_cache_memory: 512MiB, max_running: 512, max_batch_tokens: 1024}\n' \
  > /tmp/hfb.yaml
build/launch/troupe serve /tmp/hfb.yaml > /tmp/hfb.log 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
port=""
for _ in $(seq 1 200); do
  port=$(sed -n 's/^troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' /tmp/hfb.log)
  [ -n "$port" ] && break; sleep 0.1
done
[ -n "$port" ] || { cat /tmp/hfb.log; exit 1; }
echo "troupe serve on port $port ($(grep -o '[0-9]* KV blocks' /tmp/hfb.log)); $(nproc) cores"
build/bench/http_front_bench --url "http://127.0.0.1:$port" "$@"
