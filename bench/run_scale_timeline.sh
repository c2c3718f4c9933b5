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
source "$(dirname "${BASH_SOURCE[0]}")/elastic_bench_lib.sh"
bench_setup "${1:-/tmp/troupe-scale-bench}" "${2:-${1:-/tmp/troupe-scale-bench}}" timeline.yaml
at=(8 16 24)       # seconds after the start of the replay (the window's arrivals span ~35 s)
sizes=(2 4 2)

# Elastic.
serve_yaml 1
"$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$yaml" >"$work/timeline_elastic.log" 2>&1 &
pid=$!
up "$work/timeline_elastic.log" || exit 1
: >"$work/marks_elastic.txt"
t0=$(now); replay "$out/scale_timeline_elastic.svg" "$work/marks_elastic.txt" "$work/loadgen_elastic.txt"
for i in 0 1 2; do
  wait_until "${at[$i]}" "$t0"
  echo "$(now) scale to ${sizes[$i]}" >>"$work/marks_elastic.txt"
  "$troupe" scale "$url" --ranks "${sizes[$i]}" --timeout 120 | tail -1
done
wait "$lg"; lg=""
kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""

# Cold restart at the same moments.
serve_yaml 1
"$launch" -n 1 -- "$troupe" serve "$yaml" >"$work/timeline_cold.log" 2>&1 &
pid=$!
up "$work/timeline_cold.log" || exit 1
: >"$work/marks_cold.txt"
t0=$(now); replay "$out/scale_timeline_cold.svg" "$work/marks_cold.txt" "$work/loadgen_cold.txt"
for i in 0 1 2; do
  wait_until "${at[$i]}" "$t0"
  echo "$(now) restart on ${sizes[$i]}" >>"$work/marks_cold.txt"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null
  serve_yaml "${sizes[$i]}"
  "$launch" -n "${sizes[$i]}" -- "$troupe" serve "$yaml" >>"$work/timeline_cold.log" 2>&1 &
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
