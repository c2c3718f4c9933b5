#!/usr/bin/env bash
# Scale-up latency of an elastic serving group against a cold restart, on a 212 M-parameter
# Mixtral-shaped model with random weights (8 experts of 1024 x 2048, 4 layers, the byte vocabulary):
#   * elastic: troupe-launch --min-ranks 1 --max-ranks 4 starts the group on 1 rank (3 standby
#     processes); while a client keeps sending requests, `troupe scale` takes it to 2 and then 4 ranks;
#     the time is troupe scale's own: from the request to the first iteration on the new layout; once
#     with engine.weight_memory shared (a joining rank maps the pages of its source on this host), once
#     with copy (the bytes over UCX);
#   * cold restart: the same server stopped and started again on M ranks from disk (troupe-launch -n M),
#     timed from the start to the first answered request (the warm-up).
# Also counts the client's failed requests during the elastic run (the goal is 0).
#   bench/run_scale_bench.sh [WORK_DIR]       # needs build/ (troupe, troupe-launch); ~0.9 GB in WORK_DIR
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${1:-/tmp/troupe-scale-bench}"
mkdir -p "$work"
troupe=build/launch/troupe
launch=build/launch/troupe-launch
model="$work/model"
bench/make_scale_model.sh "$model" || exit 1
export TROUPE_NUM_THREADS=1 TROUPE_ADMIN_KEY=bench
now() { date +%s.%N; }
serve_yaml() {  # serve_yaml RANKS [WEIGHT_MEMORY]
  printf 'model: %s\nserver: {port: 0, admin_key: "env:TROUPE_ADMIN_KEY"}\nengine: {ranks: %s, block_size: 16, kv_cache_memory: 64MiB, dispatch: round_robin, weight_memory: %s}\nexpert: {mode: llep}\n' \
    "$model" "$1" "${2:-shared}" >"$work/serve.yaml"
}
wait_port() {  # wait_port LOG PID -> port on stdout
  for _ in $(seq 1 3000); do
    p=$(sed -n 's/^\[rank 0\] troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$1")
    [ -n "$p" ] && { echo "$p"; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
ask() {  # ask URL MAX_TOKENS -> HTTP status
  curl -s -o /dev/null -w '%{http_code}' -m 120 "$1/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"prompt\": [5, 17, 99, 4, 4, 60, 1, 2], \"max_tokens\": $2, \"temperature\": 0}"
}
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null; pid=""; }
pid=""; client=""
trap '[ -n "$client" ] && kill "$client" 2>/dev/null; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT

# Elastic: 1 -> 2 -> 4 under a client, for each weight memory.
declare -A up paused total failed
for mode in shared copy; do
  serve_yaml 1 "$mode"
  "$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$work/serve.yaml" >"$work/elastic_$mode.log" 2>&1 &
  pid=$!
  port=$(wait_port "$work/elastic_$mode.log" "$pid") || { tail "$work/elastic_$mode.log"; exit 1; }
  url="http://127.0.0.1:$port"
  [ "$(ask "$url" 1)" = 200 ] || { echo "the elastic server does not answer"; exit 1; }
  rm -f "$work/stop" "$work/statuses"
  ( while [ ! -f "$work/stop" ]; do echo "$(ask "$url" 16)" >>"$work/statuses"; done ) &
  client=$!
  for m in 2 4; do
    sleep 2
    out=$("$troupe" scale "$url" --ranks "$m" --timeout 300) || { echo "$out"; stop "$pid"; exit 1; }
    up[$mode,$m]=$(echo "$out" | sed -n 's/.*the change took \([0-9.]*\) s.*/\1/p')
    paused[$mode,$m]=$(echo "$out" | sed -n 's/.* \([0-9.]*\) s switching.*/\1/p')
    echo "$mode: $(echo "$out" | tail -1)"
  done
  sleep 2
  touch "$work/stop"; wait "$client"; client=""
  total[$mode]=$(wc -l <"$work/statuses"); failed[$mode]=$(grep -vc '^200$' "$work/statuses")
  stop "$pid"
done

# Cold restart on M ranks from disk.
declare -A cold
for m in 2 4; do
  serve_yaml "$m"
  t0=$(now)
  "$launch" -n "$m" -- "$troupe" serve "$work/serve.yaml" >"$work/cold$m.log" 2>&1 &
  pid=$!
  port=$(wait_port "$work/cold$m.log" "$pid") || { tail "$work/cold$m.log"; exit 1; }
  until [ "$(ask "http://127.0.0.1:$port" 1)" = 200 ]; do sleep 0.05; done
  cold[$m]=$(awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }')
  stop "$pid"
done
echo
echo "| change | weight memory | elastic: request -> first iteration on M ranks | of which paused (switch) | cold restart: start M ranks from disk -> first answer | elastic / cold | paused / cold |"
echo "|---|---|---:|---:|---:|---:|---:|"
for m in 2 4; do
  for mode in shared copy; do
    awk -v f=$((m / 2)) -v t="$m" -v w="$mode" -v u="${up[$mode,$m]}" -v p="${paused[$mode,$m]}" -v c="${cold[$m]}" \
      'BEGIN { printf "| %d -> %d ranks | %s | %.3f s | %.3f s | %.3f s | %.3f | %.3f |\n", f, t, w, u, p, c, u / c, p / c }'
  done
done
for mode in shared copy; do
  echo "client requests during the elastic run ($mode): ${total[$mode]}, failed: ${failed[$mode]}"
done
