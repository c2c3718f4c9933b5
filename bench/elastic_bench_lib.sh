# bench/elastic_bench_lib.sh — sourced by the elastic serving benchmarks that replay the Mooncake
# trace at a server while something happens to it (run_scale_timeline.sh, run_kill_recovery.sh).
#   source bench/elastic_bench_lib.sh; bench_setup WORK_DIR OUT_DIR YAML_NAME
#   serve_yaml RANKS                 # $work/$YAML_NAME for the 212 M model on $port
#   "$launch" ... serve "$yaml" >LOG 2>&1 & pid=$!; up LOG
#   replay SVG MARKS LOG             # bench/loadgen in the background ($lg); wait "$lg"
#   wait_until SECONDS T0            # sleep until T0 + SECONDS
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
troupe=build/launch/troupe
launch=build/launch/troupe-launch
pid=""; lg=""
trap '[ -n "$lg" ] && kill "$lg" 2>/dev/null; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT

bench_setup() {  # bench_setup WORK_DIR OUT_DIR YAML_NAME
  work="$1"; out="$2"; yaml="$1/$3"
  mkdir -p "$work" "$out"
  model="$work/model"
  bench/make_scale_model.sh "$model" || exit 1
  export TROUPE_NUM_THREADS=1 TROUPE_ADMIN_KEY=bench
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url="http://127.0.0.1:$port"
}
serve_yaml() {  # serve_yaml RANKS
  printf 'model: %s\nserver: {port: %s, admin_key: "env:TROUPE_ADMIN_KEY"}\nengine: {ranks: %s, block_size: 16, kv_cache_memory: 128MiB, max_batch_tokens: 256}\nexpert: {mode: llep}\n' \
    "$model" "$port" "$1" >"$yaml"
}
up() {  # up LOG: wait until the server answers
  for _ in $(seq 1 1200); do
    curl -sf -o /dev/null "$url/health" && return 0
    kill -0 "$pid" 2>/dev/null || { tail "$1"; return 1; }
    sleep 0.05
  done
  return 1
}
replay() {  # replay SVG MARKS LOG: 100 requests of the Mooncake trace (lines 2001-2100) over ~35 s
  build/bench/loadgen --model "$model" --url "$url" --skip 2000 --requests 100 --block-tokens 4 --time-scale 1.2 \
    --output-scale 8 --max-output 48 --allow-failures --timeline "$1" --marks "$2" >"$3" 2>&1 &
  lg=$!
}
now() { date +%s.%N; }
wait_until() { sleep "$(awk -v a="$1" -v t0="$2" -v n="$(now)" 'BEGIN { d = a - (n - t0); print (d > 0 ? d : 0) }')"; }
