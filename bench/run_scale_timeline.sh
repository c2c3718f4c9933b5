#!/usr/bin/env bash
# The serving group over time through scale events, against a cold restart: bench/loadgen --url
# replays a window of the Mooncake trace while
#   * elastic: an elastic group (troupe-launch --min-ranks 1 --max-ranks 4) is taken 1 -> 2 -> 4 -> 2
#     ranks by `troupe scale`;
#   * cold restart: the same server is stopped and started again on 2, 4 and 2 ranks from disk at the
#     same moments (same port);
# and draws each run as an SVG (throughput, TTFT, TPOT over time; failed requests; the moments
# marked). Prints loadgen's tables and the failed-request counts.
#   bench/run_scale_timeline.sh [WORK_DIR] [OUT_DIR]    # needs build/ (troupe, troupe-launch, loadgen)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${1:-/tmp/troupe-scale-bench}"
out="${2:-$work}"
mkdir -p "$work" "$out"
troupe=build/launch/troupe
launch=build/launch/troupe-launch
model="$work/model"
bench/make_scale_model.sh "$model" || exit 1
export TROUPE_NUM_THREADS=1 TROUPE_ADMIN_KEY=bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
at=(8 16 24)       # seconds after the start of the replay (the window's arrivals span ~35 s)
sizes=(2 4 2)
pid=""; lg=""
trap '[ -n "$lg" ] && kill "$lg" 2>/dev/null; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT
serve_yaml() {  # serve_yaml RANKS
  printf 'model: %s\nserver: {port: %s, admin_key: "env:TROUPE_ADMIN_KEY"}\nengine: {ranks: %s, block_size: 16, kv_cache_memory: 128MiB, max_batch_tokens: 256}\nexpert: {mode: llep}\n' \
    "$model" "$port" "$1" >"$work/timeline.yaml"
}
up() {  # up LOG: wait until the server answers
  for _ in $(seq 1 1200); do
    curl -sf -o /dev/null "$url/health" && return 0
    kill -0 "$pid" 2>/dev/null || { tail "$1"; return 1; }
    sleep 0.05
  done
  return 1
}
replay() {  # replay NAME: loadgen in the background
  build/bench/loadgen --model "$model" --url "$url" --skip 2000 --requests 100 --block-tokens 4 --time-scale 1.2 \
    --output-scale 8 --max-output 48 --allow-failures --timeline "$out/scale_timeline_$1.svg" --marks "$work/marks_$1.txt" \
    >"$work/loadgen_$1.txt" 2>&1 &
  lg=$!
}
now() { date +%s.%N; }

# Elastic.
serve_yaml 1
"$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$work/timeline.yaml" >"$work/timeline_elastic.log" 2>&1 &
pid=$!
up "$work/timeline_elastic.log" || exit 1
: >"$work/marks_elastic.txt"
t0=$(now); replay elastic
for i in 0 1 2; do
  sleep "$(awk -v a="${at[$i]}" -v t0="$t0" -v n="$(now)" 'BEGIN { d = a - (n - t0); print (d > 0 ? d : 0) }')"
  echo "$(now) scale to ${sizes[$i]}" >>"$work/marks_elastic.txt"
  "$troupe" scale "$url" --ranks "${sizes[$i]}" --timeout 120 | tail -1
done
wait "$lg"; lg=""
kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""

# Cold restart at the same moments.
serve_yaml 1
"$launch" -n 1 -- "$troupe" serve "$work/timeline.yaml" >"$work/timeline_cold.log" 2>&1 &
pid=$!
up "$work/timeline_cold.log" || exit 1
: >"$work/marks_cold.txt"
t0=$(now); replay cold
for i in 0 1 2; do
  sleep "$(awk -v a="${at[$i]}" -v t0="$t0" -v n="$(now)" 'BEGIN { d = a - (n - t0); print (d > 0 ? d : 0) }')"
  echo "$(now) restart on ${sizes[$i]}" >>"$work/marks_cold.txt"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null
  serve_yaml "${sizes[$i]}"
  "$launch" -n "${sizes[$i]}" -- "$troupe" serve "$work/timeline.yaml" >>"$work/timeline_cold.log" 2>&1 &
  pid=$!
  up "$work/timeline_cold.log" || exit 1
  echo "$(now) up on ${sizes[$i]}" >>"$work/marks_cold.txt"
done
wait "$lg"; lg=""
kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""
for n in elastic cold; do
  echo "=== $n"
  grep -E "^\| |check|failed request|timeline" "$work/loadgen_$n.txt"
done
