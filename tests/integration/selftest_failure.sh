#!/usr/bin/env bash
# Failure without hangs: ranks started by troupe-launch run a loop of checked
# all_reduces (UCX, bootstrapped through the supervisor) and one rank is killed.
#   tests/integration/selftest_failure.sh TROUPE_LAUNCH TROUPE_BIN
# A. kill -9 of rank 2: the supervisor names rank 2, its pid and the lost connection;
#    ranks 0 and 1 exit on their own with code 3 and the reason; the launcher fails.
# B. SIGSTOP of rank 2: detected by the heartbeat timeout, same teardown.
# C. --max-restarts 1: after the kill the survivors rebuild the group (epoch 2, 2 ranks)
#    and finish the loop; ranks 0 and 1 exit 0.
# D. a process claiming rank 1 with the wrong cluster token is refused (exit 5) and the
#    real rank 1 still joins.
set -uo pipefail
launch="$1"; troupe="$2"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$tmp/log" ] && { echo "--- log:"; cat "$tmp/log"; }; exit 1; }
export TROUPE_LOG_LEVEL=info

# wait_for PATTERN SECONDS: until the log has a line matching PATTERN
wait_for() {
  for _ in $(seq $(( $2 * 10 ))); do grep -q "$1" "$tmp/log" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
# the pid rank $1 printed when its loop started
loop_pid() { sed -n "s/^\[rank $1\].*collective loop running: pid \([0-9]*\),.*/\1/p" "$tmp/log" | tail -1; }
# wait_exit PID SECONDS -> sets rc; fails if still running
wait_exit() {
  for _ in $(seq $(( $2 * 10 ))); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && fail "the launcher still runs $2 s after the failure"
  wait "$1"; rc=$?
}

run_case() {  # run_case SIGNAL EXTRA_ARGS...
  local sig="$1"; shift
  : > "$tmp/log"
  "$launch" -n 3 --settle-ms 3000 --grace-ms 2000 -- "$troupe" selftest --backends none --pings 10 \
      --loop 1000000 --loop-sleep-ms 1 --heartbeat-ms 200 --heartbeat-timeout-ms 2000 "$@" >"$tmp/log" 2>&1 &
  lpid=$!; pids+=("$lpid")
  wait_for '^\[rank 2\].*collective loop running' 60 || fail "rank 2 never started its loop"
  victim=$(loop_pid 2)
  [ -n "$victim" ] || fail "no pid for rank 2"
  sleep 0.5
  kill "-$sig" "$victim"
  t0=$(date +%s)
}

# A. kill -9
run_case KILL
wait_exit "$lpid" 40
[ "$rc" -ne 0 ] || fail "A: launcher exited 0 after a rank was killed"
grep -q "supervisor: rank 2 (pid $victim on .*) lost: connection lost" "$tmp/log" || fail "A: supervisor did not name rank 2"
for r in 0 1; do
  grep -q "^\[rank $r\].*stopping with exit code 3: rank 2 (pid $victim" "$tmp/log" || fail "A: rank $r gave no reason"
  grep -Eq "troupe-launch: rank $r (exited|failed): exit code 3" "$tmp/log" || fail "A: rank $r did not exit on its own with 3"
done
echo "A: kill -9 of rank 2 (pid $victim): reported and torn down in $(( $(date +%s) - t0 )) s"

# B. SIGSTOP: only the heartbeat can tell
run_case STOP
wait_exit "$lpid" 40
[ "$rc" -ne 0 ] || fail "B: launcher exited 0"
grep -q "supervisor: rank 2 (pid $victim on .*) lost: no heartbeat for [0-9]* ms (timeout 2000 ms)" "$tmp/log" \
  || fail "B: no heartbeat timeout for rank 2"
for r in 0 1; do
  grep -Eq "troupe-launch: rank $r (exited|failed): exit code 3" "$tmp/log" || fail "B: rank $r did not exit with 3"
done
kill -0 "$victim" 2>/dev/null && fail "B: the stopped rank survived the launcher"
echo "B: SIGSTOP of rank 2: heartbeat timeout, torn down in $(( $(date +%s) - t0 )) s"

# C. one restart: the survivors rebuild and finish
: > "$tmp/log"
"$launch" -n 3 --settle-ms 20000 -- "$troupe" selftest --backends none --pings 10 --loop 3000 --loop-sleep-ms 1 \
    --heartbeat-ms 200 --heartbeat-timeout-ms 2000 --max-restarts 1 >"$tmp/log" 2>&1 &
lpid=$!; pids+=("$lpid")
wait_for '^\[rank 2\].*collective loop running' 60 || fail "C: rank 2 never started its loop"
victim=$(loop_pid 2)
sleep 0.3
kill -9 "$victim"
wait_exit "$lpid" 60
[ "$rc" -eq 137 ] || fail "C: launcher should report rank 2's SIGKILL (137), got $rc"
grep -q "rebuilding the group as epoch 2 with 2 ranks (restart 1 of 1)" "$tmp/log" || fail "C: no rebuild"
for r in 0 1; do
  grep -q "^\[rank 0\] rank $r: collective loop: 3000 all_reduces of 4096 i64 checked in epoch 2 with 2 ranks" "$tmp/log" \
    || fail "C: rank $r did not finish the loop in epoch 2"
done
grep -q "^\[rank 0\] selftest: PASS" "$tmp/log" || fail "C: no PASS"
grep -Eq "troupe-launch: rank [01] exited: (exit code [1-9]|killed)" "$tmp/log" && fail "C: a survivor exited non-zero"
echo "C: kill -9 with --max-restarts 1: the 2 survivors rebuilt the group and finished"

# D. the wrong token is refused
port=$(( 20000 + RANDOM % 20000 ))
: > "$tmp/log"
env TROUPE_RANK=0 TROUPE_WORLD_SIZE=2 TROUPE_SUPERVISOR=127.0.0.1:$port TROUPE_CLUSTER_TOKEN=right-token \
  "$troupe" selftest --backends none --pings 5 --join-timeout-ms 20000 >"$tmp/log" 2>&1 &
r0=$!; pids+=("$r0")
sleep 0.5
out=$(env TROUPE_RANK=1 TROUPE_WORLD_SIZE=2 TROUPE_SUPERVISOR=127.0.0.1:$port TROUPE_CLUSTER_TOKEN=wrong-token \
  timeout 30 "$troupe" selftest --backends none 2>&1); rc=$?
[ "$rc" -eq 5 ] || fail "D: intruder exit code $rc, want 5: $out"
grep -q "wrong cluster token" <<<"$out" || fail "D: intruder got no reason: $out"
out=$(env TROUPE_RANK=1 TROUPE_WORLD_SIZE=2 TROUPE_SUPERVISOR=127.0.0.1:$port TROUPE_CLUSTER_TOKEN=right-token \
  timeout 30 "$troupe" selftest --backends none 2>&1); rc=$?
[ "$rc" -eq 0 ] || fail "D: the real rank 1 failed ($rc): $out"
wait_exit "$r0" 20
[ "$rc" -eq 0 ] || fail "D: rank 0 exited $rc"
grep -q "refused a join claiming rank 1 .*: wrong cluster token" "$tmp/log" || fail "D: supervisor did not log the refusal"
echo "D: a join with the wrong token was refused; the real rank joined"
echo "selftest failure scenarios: all passed"
