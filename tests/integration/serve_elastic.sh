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
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fixtures="$root/tests/fixtures"
launch="$(dirname "$troupe")/troupe-launch"
tmp=$(mktemp -d)
pid=""; load=""
cleanup() {
  [ -n "$load" ] && kill "$load" 2>/dev/null
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$tmp/server.log" ] && { echo "--- server log:"; tail -40 "$tmp/server.log"; }; exit 1; }
command -v curl >/dev/null || { echo "SKIP: no curl"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: no python3"; exit 77; }
export TROUPE_NUM_THREADS=1

printf 'model: %s\nserver: {port: 0, api_key: "sk-test", admin_key: "adm-test"}\nengine: {ranks: 1, block_size: 4, kv_cache_memory: 4MiB, dispatch: round_robin}\nexpert: {mode: llep}\n' \
  "$fixtures/mixtral_moe" >"$tmp/serve.yaml"
"$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/server.log" 2>&1 &
pid=$!
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/^\[rank 0\] troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$tmp/server.log")
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || fail "the server exited at start"
  sleep 0.1
done
[ -n "$port" ] || fail "the server did not print its port"
url="http://127.0.0.1:$port"
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

# Clients: 6 threads, each request greedy with 48 new tokens, every other one streamed, until $tmp/stop.
cat >"$tmp/clients.py" <<'PY'
import json, os, sys, threading, urllib.request
url, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
prompts = [[3,17,99,4,4,60,1,2], [5,6,7,8,9,10,11,12,13,14,15], [40,41,42], [3,17,99,4,4,60,1,2,7,7], [88,2,61], [9,9,9,1]]
lock = threading.Lock()
def one(k, i):
    p = prompts[(k + i) % len(prompts)]
    stream = (k + i) % 2 == 1
    body = json.dumps({"prompt": p, "max_tokens": 48, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Authorization": "Bearer sk-test", "Content-Type": "application/json"})
    rec = {"prompt": p, "stream": stream}
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            rec["status"] = r.status
            if stream:
                text, reason = "", None
                for line in r:
                    line = line.decode()
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])["choices"][0]
                        text += c["text"]
                        reason = c.get("finish_reason") or reason
                rec["text"], rec["reason"] = text, reason
            else:
                c = json.load(r)["choices"][0]
                rec["text"], rec["reason"] = c["text"], c["finish_reason"]
    except Exception as e:
        rec["status"], rec["error"] = getattr(e, "code", 0), str(e)
    rec["ids"] = ",".join(str(ord(ch)) for ch in rec.get("text", ""))
    with lock:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
def worker(k):
    i = 0
    while not os.path.exists(stop):
        one(k, i)
        i += 1
ts = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
for t in ts: t.start()
for t in ts: t.join()
PY
python3 "$tmp/clients.py" "$url" "$tmp/answers.jsonl" "$tmp/stop" &
load=$!
sleep 1
for m in 2 4 2 1; do
  "$troupe" scale "$url" --ranks $m --admin-key adm-test --timeout 60 >"$tmp/scale.log" 2>&1 \
    || fail "troupe scale --ranks $m: $(cat "$tmp/scale.log")"
  grep -q "serves on $m ranks" "$tmp/scale.log" || fail "troupe scale --ranks $m: $(cat "$tmp/scale.log")"
  echo "scaled to $m: $(tail -1 "$tmp/scale.log" | sed 's/.*; the change/the change/')"
  sleep 1.5
done
touch "$tmp/stop"
wait "$load"; load=""
n=$(wc -l <"$tmp/answers.jsonl")
[ "$n" -ge 20 ] || fail "only $n requests were answered"
python3 - "$tmp/answers.jsonl" "$troupe" "$fixtures/mixtral_moe" >"$tmp/bad" <<'PY'
import json, subprocess, sys
want = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("status") != 200 or d.get("reason") != "length" or "error" in d:
        print("failed: " + json.dumps(d)); continue
    p = ",".join(map(str, d["prompt"]))
    if p not in want:
        want[p] = subprocess.run([sys.argv[2], "generate", sys.argv[3], "--prompt-ids", p, "--max-new-tokens", "48"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    if d["ids"] != want[p]:
        print(f"prompt {p}: {d['ids']} != troupe generate {want[p]} ({json.dumps(d)})")
PY
[ -s "$tmp/bad" ] && fail "$(wc -l <"$tmp/bad") requests failed or differ from troupe generate: $(head -3 "$tmp/bad")"
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
