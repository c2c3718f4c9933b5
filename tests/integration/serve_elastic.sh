#!/usr/bin/env bash
# An elastic `troupe serve` group under troupe-launch (--min-ranks 1 --max-ranks 4) on the MoE
# fixture, driven by clients on 127.0.0.1 while it goes 1 -> 2 -> 4 -> 2 -> 1 ranks with
# `troupe scale`:
#   * every request (streamed and not) completes, with greedy output equal to `troupe generate`;
#     samples running on the ranks that leave go on elsewhere (/metrics counts them);
#   * bad scale requests — 0 ranks, above the pool, a size that does not divide the experts, a wrong
#     or missing admin key, the API key instead of the admin key — get their 4xx and change nothing;
#   * /metrics shows the scale events; SIGTERM stops every rank with exit code 0.
#   tests/integration/serve_elastic.sh TROUPE_BIN
set -uo pipefail
troupe="$1"
source "$(dirname "${BASH_SOURCE[0]}")/elastic_lib.sh"

start_elastic 1 4
grep -q "1 rank(s).*elastic: 4 processes, at least 1 serving" "$tmp/server.log" || fail "not an elastic group of 4"

# Bad scale requests: each its status, and the group stays at 1 rank.
admin() {  # admin KEY JSON -> status
  curl -s -o "$tmp/body" -w '%{http_code}' -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
    -d "$2" "$url/admin/scale"
}
[ "$(admin adm-test '{"ranks": 0}')" = 400 ] || fail "ranks 0: $(cat "$tmp/body")"
[ "$(admin adm-test '{"ranks": 5}')" = 400 ] || fail "ranks 5: $(cat "$tmp/body")"
grep -q 'outside \[1, 4\]' "$tmp/body" || fail "ranks 5: unclear: $(cat "$tmp/body")"
[ "$(admin adm-test '{"ranks": 3}')" = 400 ] || fail "ranks 3: $(cat "$tmp/body")"
grep -q "do not divide the model's 4 experts" "$tmp/body" || fail "ranks 3: unclear: $(cat "$tmp/body")"
[ "$(admin adm-test '{"ranks": "2"}')" = 400 ] || fail "ranks \"2\": $(cat "$tmp/body")"
[ "$(admin adm-test '{"ranks": 2, "now": true}')" = 400 ] || fail "an unknown field: $(cat "$tmp/body")"
[ "$(admin wrong '{"ranks": 2}')" = 401 ] || fail "a wrong admin key: $(cat "$tmp/body")"
[ "$(admin sk-test '{"ranks": 2}')" = 401 ] || fail "the API key opened the admin API: $(cat "$tmp/body")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/admin/scale")" = 401 ] || fail "GET /admin/scale without a key"
"$troupe" scale "$url" --ranks 2 --admin-key wrong >"$tmp/scale.log" 2>&1 && fail "troupe scale with a wrong key succeeded"
curl -s -H 'Authorization: Bearer adm-test' "$url/admin/scale" >"$tmp/st"
python3 -c "import json; d=json.load(open('$tmp/st')); assert d['ranks']==1 and d['layout']==1 and d['state']=='idle', d" \
  || fail "a refused change changed something: $(cat "$tmp/st")"
echo "bad scale requests: 400 (0, 5, 3 ranks, a string, an unknown field), 401 (wrong key, the API key, none); nothing changed"

start_clients
sleep 1
for m in 2 4 2 1; do
  "$troupe" scale "$url" --ranks $m --admin-key adm-test --timeout 60 >"$tmp/scale.log" 2>&1 \
    || fail "troupe scale --ranks $m: $(cat "$tmp/scale.log")"
  grep -q "serves on $m ranks" "$tmp/scale.log" || fail "troupe scale --ranks $m: $(cat "$tmp/scale.log")"
  echo "scaled to $m: $(tail -1 "$tmp/scale.log" | sed 's/.*; the change/the change/')"
  sleep 1.5
done
stop_clients
check_answers
curl -sf -m 10 "$url/metrics" >"$tmp/metrics" || fail "/metrics"
grep -q '^troupe_scale_events_total{direction="up"} 2$' "$tmp/metrics" || fail "/metrics: 2 scale-ups"
grep -q '^troupe_scale_events_total{direction="down"} 2$' "$tmp/metrics" || fail "/metrics: 2 scale-downs"
grep -q '^troupe_engine_ranks 1$' "$tmp/metrics" || fail "/metrics: not back to 1 rank"
moved=$(sed -n 's/^troupe_scale_moved_samples_total \([0-9]*\)$/\1/p' "$tmp/metrics")
[ "${moved:-0}" -gt 0 ] || fail "no sample was running on a rank that left (moved: ${moved:-none})"
echo "$n requests (half streamed) through 1 -> 2 -> 4 -> 2 -> 1 ranks: none failed, every answer = troupe generate; $moved samples moved off leaving ranks"
kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "the group did not stop on SIGTERM"
wait "$pid"
for r in 0 1 2 3; do
  grep -q "rank $r exited: exit code 0" "$tmp/server.log" || fail "rank $r did not stop cleanly"
done
pid=""
echo "SIGTERM: every rank exited 0"
