#!/usr/bin/env bash
# Processes that join a running elastic `troupe serve` group from outside, with the cluster token, as
# from another host or launcher (actors/supervisor.h invariant 8, dp_member.h invariant 10):
#   * the group starts on 1 process with 2 open slots (troupe-launch --open-slots 2) while clients
#     stream requests at it;
#   * a second launcher (`troupe-launch --join HOST:PORT -n 1`) adds a process: it waits as standby
#     and `troupe scale --ranks 2` takes it in (weights from rank 0, peer-to-peer);
#   * a third launcher brings 2 more: one takes the last slot, the other is refused (all slots
#     taken) and that launcher goes on; the first joined process is killed and the group recovers on
#     rank 0, then grows into the second joined one;
#   * a join with the wrong token is refused; every request (streamed and not) completes with greedy
#     output equal to `troupe generate`; SIGTERM stops every process, the joined ones with code 0.
#   tests/integration/serve_elastic_join.sh TROUPE_BIN
set -uo pipefail
troupe="$1"
source "$(dirname "${BASH_SOURCE[0]}")/elastic_lib.sh"
export TROUPE_CLUSTER_TOKEN="join-test-$$-$RANDOM"
joins=()
stop_joins() { for j in "${joins[@]}"; do kill -TERM "$j" 2>/dev/null; done; }
trap 'stop_joins; cleanup' EXIT

start_elastic 1 1 --open-slots 2
grep -q "elastic: 1 processes + 2 open slot(s), at least 1 serving" "$tmp/server.log" || fail "not an elastic group with open slots"
sup=$(sed -n 's/.*troupe-launch --join \([^ ]*\) -n N.*/\1/p' "$tmp/server.log" | head -1)
[ -n "$sup" ] || fail "troupe-launch did not say how to join"
status() { curl -s -m 10 -H 'Authorization: Bearer adm-test' "$url/admin/scale"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
wait_field() {  # wait_field NAME VALUE: until GET /admin/scale says so (30 s)
  for _ in $(seq 1 300); do
    [ "$(field "$(status)" "$1" 2>/dev/null)" = "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 did not come to $2: $(status)"
}
scale() {
  "$troupe" scale "$url" --ranks "$1" --admin-key adm-test --timeout 60 >"$tmp/scale.log" 2>&1 \
    || fail "troupe scale --ranks $1: $(cat "$tmp/scale.log")"
  grep -q "serves on $1 ranks" "$tmp/scale.log" || fail "troupe scale --ranks $1: $(cat "$tmp/scale.log")"
}
pid_of() { sed -n "s/.*supervisor: rank $1 joined the running group late (pid \([0-9]*\) .*/\1/p" "$tmp/server.log"; }

TROUPE_CLUSTER_TOKEN=wrong "$launch" --join "$sup" -n 1 -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/wrong.log" 2>&1
code=$?
grep -q "wrong cluster token" "$tmp/wrong.log" || fail "a join with the wrong token: $(tail -5 "$tmp/wrong.log")"
[ "$code" = 5 ] || fail "a refused join's launcher exited $code, not 5"
echo "a join with the wrong token is refused (its launcher exits 5)"
sed "s|$fixtures/mixtral_moe|$fixtures/qwen2_moe|" "$tmp/serve.yaml" >"$tmp/other.yaml"
"$launch" --join "$sup" -n 1 -- "$troupe" serve "$tmp/other.yaml" >"$tmp/other.log" 2>&1
code=$?
grep -q "is not the model the running group serves" "$tmp/other.log" || fail "a joiner with another model: $(tail -5 "$tmp/other.log")"
[ "$code" != 0 ] || fail "a joiner with another model: its launcher exited 0"
grep -q "rank 1 .* lost: its command failed" "$tmp/server.log" || fail "the supervisor kept the refused joiner's slot"
echo "a joiner with another model is refused before any weight moves (its launcher exits $code; its slot is free again)"

start_clients
sleep 1
"$launch" --join "$sup" -n 1 -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/join1.log" 2>&1 &
joins+=($!)
wait_field pool_ranks 2
scale 2
echo "a process joined from outside (rank 2, pid $(pid_of 2)) and was taken in: the group serves on 2 ranks"
sleep 1.5
"$launch" --join "$sup" -n 2 -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/join2.log" 2>&1 &
joins+=($!)
wait_field pool_ranks 3
for _ in $(seq 1 100); do grep -q "open slot(s) are taken" "$tmp/join2.log" && break; sleep 0.1; done
grep -q "all 2 open slot(s) are taken" "$tmp/join2.log" || fail "a join past the open slots: $(tail -5 "$tmp/join2.log")"
kill -9 "$(pid_of 2)"
wait_field ranks 1
echo "two more processes came: one took the last slot (rank 3), one was refused; rank 2 killed: the group recovered on 1 rank"
scale 2
echo "and grew into rank 3: 2 ranks"
sleep 1.5
stop_clients
check_answers
echo "$n requests (half streamed) through a join, a scale-up, a refused join, a kill and another scale-up: none failed, every answer = troupe generate"
kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the group did not stop on SIGTERM"
wait "$pid"
grep -q "rank 0 exited: exit code 0" "$tmp/server.log" || fail "rank 0 did not stop cleanly"
pid=""
codes=()
for j in "${joins[@]}"; do
  for _ in $(seq 1 100); do kill -0 "$j" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$j" 2>/dev/null && fail "a joining launcher did not stop with the group"
  wait "$j"; codes+=($?)
done
joins=()
[ "${codes[*]}" = "137 0" ] || fail "the joining launchers exited with ${codes[*]}, not 137 (its one process killed) and 0"
grep -q "joined process 0 lost: killed by signal 9" "$tmp/join1.log" || fail "the first joining launcher does not report its killed process: $(tail -3 "$tmp/join1.log")"
grep -q "the other rank(s) exited with code 0; rank(s) [01] lost on the way" "$tmp/join2.log" \
  || fail "the process on the last slot did not stop cleanly: $(tail -5 "$tmp/join2.log")"
echo "SIGTERM: every process stopped; the joined one on the last slot with code 0 (its launcher too; the first one's exits 137: its one process was killed)"
