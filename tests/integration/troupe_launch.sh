#!/usr/bin/env bash
# troupe-launch: environment per rank, rank-prefixed output, fail-fast teardown with the
# failing rank and reason, SIGKILL of a rank, signal forwarding, and no leftovers.
#   tests/integration/troupe_launch.sh TROUPE_LAUNCH_BIN TROUPE_BIN
set -uo pipefail
launch="$1"; troupe="$2"
fail() { echo "FAIL: $*"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# 1. every rank runs with its environment; output is prefixed per line
out=$(timeout 60 "$launch" -n 3 -- sh -c 'echo "hello $TROUPE_RANK of $TROUPE_WORLD_SIZE token=${#TROUPE_CLUSTER_TOKEN}"' 2>&1) \
  || fail "3 healthy ranks did not exit 0: $out"
for r in 0 1 2; do grep -q "^\[rank $r\] hello $r of 3 token=32$" <<<"$out" || fail "rank $r line missing: $out"; done

# 2. troupe itself discovers its rank from the launcher's environment
out=$(timeout 60 "$launch" -n 2 -- "$troupe" info 2>&1) || fail "troupe info under the launcher failed: $out"
grep -q '^\[rank 1\] rank: *1 of 2 (local 1 of 2; from troupe), supervisor 127.0.0.1:' <<<"$out" || fail "rank discovery: $out"

# 3. one rank exits 7: the others (sleeping 60 s) are stopped, exit code 7, reason named
start=$(date +%s)
out=$(timeout 60 "$launch" -n 3 --settle-ms 500 --grace-ms 2000 -- sh -c '[ "$TROUPE_RANK" = 1 ] && exit 7; exec sleep 60' 2>&1); rc=$?
[ $rc -eq 7 ] || fail "expected exit 7, got $rc: $out"
grep -q 'rank 1 failed: exit code 7' <<<"$out" || fail "no failure reason: $out"
[ $(( $(date +%s) - start )) -lt 20 ] || fail "teardown took too long"

# 4. kill -9 of one rank: reported with the signal, exit 128+9
out=$(timeout 60 "$launch" -n 3 --settle-ms 0 -- sh -c '[ "$TROUPE_RANK" = 2 ] && kill -9 $$; exec sleep 60' 2>&1); rc=$?
[ $rc -eq 137 ] || fail "expected 137, got $rc: $out"
grep -q 'rank 2 failed: killed by signal 9 (SIGKILL)' <<<"$out" || fail "no SIGKILL reason: $out"

# 5. SIGTERM to the launcher is forwarded; no rank survives
"$launch" -n 2 -- sh -c 'echo $$ > '"$tmp"'/pid.$TROUPE_RANK; exec sleep 60' >"$tmp/log" 2>&1 &
lpid=$!
for _ in $(seq 50); do [ -s "$tmp/pid.0" ] && [ -s "$tmp/pid.1" ] && break; sleep 0.1; done
[ -s "$tmp/pid.1" ] || { kill -9 $lpid; fail "ranks did not start"; }
kill -TERM $lpid
for _ in $(seq 100); do kill -0 $lpid 2>/dev/null || break; sleep 0.1; done
if kill -0 $lpid 2>/dev/null; then kill -9 $lpid; fail "launcher still running 10 s after SIGTERM"; fi
wait $lpid; rc=$?
[ $rc -ne 0 ] || fail "interrupted launcher exited 0"
for r in 0 1; do kill -0 "$(cat "$tmp/pid.$r")" 2>/dev/null && fail "rank $r survived the launcher"; done

# 6. a command that does not exist
out=$(timeout 60 "$launch" -n 2 -- /nonexistent/troupe-cmd 2>&1); rc=$?
[ $rc -eq 127 ] || fail "expected 127, got $rc"
grep -q "cannot run '/nonexistent/troupe-cmd'" <<<"$out" || fail "no exec error: $out"

# 7. --hosts wraps mpirun
out=$("$launch" -n 4 --hosts h1,h2 --dry-run -- troupe info) || fail "dry run failed"
grep -q '^mpirun -H h1,h2 -np 4 --tag-output -x TROUPE_CLUSTER_TOKEN=[0-9a-f]\{32\} -x TROUPE_SUPERVISOR=h1:29400 troupe info$' <<<"$out" \
  || fail "mpirun command: $out"
echo "troupe-launch: 7 scenarios passed"
