#!/usr/bin/env bash
# Recovery after a rank is killed (SIGKILL) while the group serves, against a restart: bench/loadgen
# --url replays a window of the Mooncake trace at a 4-rank group of the 212 M model while
#   * elastic: the group (troupe-launch --min-ranks 1 --max-ranks 4) loses rank 2 at 8 s and rank 1 at
#     18 s and goes on with the survivors (elastic/scale/dp_group.h invariant 8);
#   * restart: a fixed group (troupe-launch -n 4) loses rank 2 at 8 s, is torn down (every rank exits)
#     and is started again from disk on 2 ranks at once (what a job scheduler would do), then loses
#     rank 1 at 18 s and is started again on 2 ranks;
# Each kill is timed to the first answer to a new request (a 1-token completion sent right after the
# kill, retried while refused). Draws each run as an SVG; prints loadgen's tables, the failed
# requests and the recovery times.
#   bench/run_kill_recovery.sh [WORK_DIR] [OUT_DIR]    # needs build/ (troupe, troupe-launch, loadgen)
source "$(dirname "${BASH_SOURCE[0]}")/elastic_bench_lib.sh"
bench_setup "${1:-/tmp/troupe-scale-bench}" "${2:-${1:-/tmp/troupe-scale-bench}}" kill.yaml
at=(8 18)          # seconds after the start of the replay (the window's arrivals span ~35 s)
victims=(2 1)
first_answer() {  # first_answer T_KILL: seconds from T_KILL to the first answered new request
  for _ in $(seq 1 3000); do
    if curl -sf -m 60 -o /dev/null -H 'Content-Type: application/json' \
         -d '{"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}' "$url/v1/completions"; then
      awk -v t="$1" -v n="$(now)" 'BEGIN { printf "%.3f", n - t }'
      return 0
    fi
    sleep 0.02
  done
  echo never
}
pid_of() { sed -n "s/.*supervisor: rank $2 joined (pid \([0-9]*\) .*/\1/p" "$1" | tail -1; }

# Elastic: the group goes on.
serve_yaml 4
"$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$yaml" >"$work/kill_elastic.log" 2>&1 &
pid=$!
up "$work/kill_elastic.log" || exit 1
: >"$work/kmarks_elastic.txt"
t0=$(now); replay "$out/kill_timeline_elastic.svg" "$work/kmarks_elastic.txt" "$work/kill_loadgen_elastic.txt"
for i in 0 1; do
  wait_until "${at[$i]}" "$t0"
  v=$(pid_of "$work/kill_elastic.log" "${victims[$i]}")
  tk=$(now); kill -9 "$v"
  echo "$tk kill rank ${victims[$i]}" >>"$work/kmarks_elastic.txt"
  echo "elastic: rank ${victims[$i]} killed; a new request answered after $(first_answer "$tk") s"
done
wait "$lg"; lg=""
kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""
# Kill -> the group rebuilt (rank 0's "recovered" line), from the log's wall-clock stamps.
python3 - "$work/kmarks_elastic.txt" "$work/kill_elastic.log" <<'PY'
import datetime, re, sys
kills = [float(l.split()[0]) for l in open(sys.argv[1]) if l.strip()]
done = []
for line in open(sys.argv[2]):
    m = re.search(r"\[rank 0\] \[(\d\d:\d\d:\d\d\.\d+)\].*recovered in ([0-9.]+) s: (\d+) ranks", line)
    if m:
        day = datetime.datetime.fromtimestamp(kills[0]).date()
        t = datetime.datetime.combine(day, datetime.time.fromisoformat(m.group(1))).timestamp()
        done.append((t, m.group(2), m.group(3)))
for k, (t, took, ranks) in zip(kills, done):
    print(f"elastic: kill -> serving again on {ranks} ranks: {t - k:.3f} s (the recovery itself {float(took):.3f} s)")
PY

# Restart: the group is torn down and started again on 2 ranks.
serve_yaml 4
"$launch" -n 4 -- "$troupe" serve "$yaml" >"$work/kill_restart.log" 2>&1 &
pid=$!
up "$work/kill_restart.log" || exit 1
: >"$work/kmarks_restart.txt"
t0=$(now); replay "$out/kill_timeline_restart.svg" "$work/kmarks_restart.txt" "$work/kill_loadgen_restart.txt"
for i in 0 1; do
  wait_until "${at[$i]}" "$t0"
  v=$(pid_of "$work/kill_restart.log" "${victims[$i]}")
  tk=$(now); kill -9 "$v"
  echo "$tk kill rank ${victims[$i]}" >>"$work/kmarks_restart.txt"
  wait "$pid" 2>/dev/null  # the group tears itself down
  serve_yaml 2
  "$launch" -n 2 -- "$troupe" serve "$yaml" >>"$work/kill_restart.log" 2>&1 &
  pid=$!
  echo "restart: rank ${victims[$i]} killed; a new request answered after $(first_answer "$tk") s"
  echo "$(now) up on 2" >>"$work/kmarks_restart.txt"
done
wait "$lg"; lg=""
kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""
for n in elastic restart; do
  echo "=== $n"
  grep -E "^\| |check|failed request|timeline" "$work/kill_loadgen_$n.txt"
done
