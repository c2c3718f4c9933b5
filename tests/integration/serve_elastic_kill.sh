#!/usr/bin/env bash
# Ranks of an elastic `troupe serve` group killed with SIGKILL while clients stream requests at it
# (troupe-launch --min-ranks 1 --max-ranks 4 on the MoE fixture, all 4 serving):
#   * a middle rank (2), then another (1): the group goes on with the survivors each time
#     (elastic/scale/dp_group.h invariant 8); the lost ranks' requests resume on the survivors;
#   * then it shrinks to 1 rank and grows back to 2 with the rank left (`troupe scale`), a standby
#     rank is killed, and growing past the processes alive is refused (400, nothing changes);
#   * every request (streamed and not) completes with greedy output equal to `troupe generate`;
#   * /metrics and GET /admin/scale count the recoveries; SIGTERM stops the survivors with exit code 0
#     and troupe-launch names the ranks lost on the way.
#   tests/integration/serve_elastic_kill.sh TROUPE_BIN
set -uo pipefail
troupe="$1"
source "$(dirname "${BASH_SOURCE[0]}")/elastic_lib.sh"

start_elastic 4 4
grep -q "4 rank(s).*elastic: 4 processes, at least 1 serving" "$tmp/server.log" || fail "not an elastic group of 4 serving"
pid_of() { sed -n "s/.*supervisor: rank $1 joined (pid \([0-9]*\) .*/\1/p" "$tmp/server.log"; }
status() { curl -s -m 10 -H 'Authorization: Bearer adm-test' "$url/admin/scale"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
wait_ranks() {  # wait_ranks N: until the group serves on N ranks (20 s)
  for _ in $(seq 1 200); do
    [ "$(field "$(status)" ranks 2>/dev/null)" = "$1" ] && return 0
    sleep 0.1
  done
  fail "the group did not come to $1 ranks: $(status)"
}

start_clients
sleep 1.5
for victim in 2 1; do
  vpid=$(pid_of $victim)
  [ -n "$vpid" ] || fail "no pid for rank $victim"
  before=$(field "$(status)" ranks)
  kill -9 "$vpid"
  wait_ranks $((before - 1))
  echo "rank $victim (pid $vpid) killed: the group serves on $((before - 1)) ranks; recovery $(field "$(status)" last_recovery_seconds) s"
  sleep 1.5
done
for m in 1 2; do
  "$troupe" scale "$url" --ranks $m --admin-key adm-test --timeout 60 >"$tmp/scale.log" 2>&1 \
    || fail "troupe scale --ranks $m after the losses: $(cat "$tmp/scale.log")"
  grep -q "serves on $m ranks" "$tmp/scale.log" || fail "troupe scale --ranks $m: $(cat "$tmp/scale.log")"
  sleep 1
done
echo "then scaled to 1 and back to 2 ranks"
"$troupe" scale "$url" --ranks 1 --admin-key adm-test --timeout 60 >"$tmp/scale.log" 2>&1 || fail "back to 1 rank"
kill -9 "$(pid_of 3)"  # the standby rank
for _ in $(seq 1 100); do [ "$(field "$(status)" pool_ranks)" = 1 ] && break; sleep 0.1; done
[ "$(field "$(status)" pool_ranks)" = 1 ] || fail "the lost standby rank is still counted: $(status)"
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H 'Authorization: Bearer adm-test' -H 'Content-Type: application/json' \
  -d '{"ranks": 2}' "$url/admin/scale")
[ "$code" = 400 ] || fail "2 ranks with 1 process alive: $code $(cat "$tmp/body")"
grep -q "3 lost" "$tmp/body" || fail "the refusal does not say why: $(cat "$tmp/body")"
echo "standby rank 3 killed: growing to 2 ranks is refused (400: $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['error']['message'])" "$tmp/body"))"
sleep 1
stop_clients
check_answers
curl -sf -m 10 "$url/metrics" >"$tmp/metrics" || fail "/metrics"
grep -q '^troupe_scale_recoveries_total 2$' "$tmp/metrics" || fail "/metrics: 2 recoveries: $(grep recover "$tmp/metrics")"
grep -q '^troupe_scale_lost_ranks_total 2$' "$tmp/metrics" || fail "/metrics: 2 serving ranks lost"
grep -q '^troupe_scale_pool_ranks 1$' "$tmp/metrics" || fail "/metrics: 1 process alive"
moved=$(sed -n 's/^troupe_scale_moved_samples_total \([0-9]*\)$/\1/p' "$tmp/metrics")
echo "$n requests (half streamed) through 2 kills, 4 -> 3 -> 2 -> 1 -> 2 -> 1 ranks and a lost standby: none failed, every answer = troupe generate; $moved samples resumed elsewhere"
kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the group did not stop on SIGTERM"
wait "$pid"
grep -q "rank 0 exited: exit code 0" "$tmp/server.log" || fail "rank 0 did not stop cleanly"
grep -q "rank(s) 2, 1, 3 lost on the way" "$tmp/server.log" || fail "troupe-launch does not name the lost ranks"
pid=""
echo "SIGTERM: rank 0 exited 0; troupe-launch names ranks 2, 1, 3 as lost"
