# tests/integration/elastic_lib.sh — sourced by the elastic serving tests (serve_elastic.sh,
# serve_elastic_kill.sh): an elastic `troupe serve` group of the MoE fixture under troupe-launch on a
# free port, the clients that load it, and the check of their answers against `troupe generate`.
#   troupe=...; source elastic_lib.sh
#   start_elastic RANKS MAX_RANKS [ARGS]    # sets $pid, $port, $url; the log is $tmp/server.log; ARGS go to
#                                           # troupe-launch
#   start_clients; ...; stop_clients         # 6 threads, greedy 48 tokens, half streamed -> $tmp/answers.jsonl
#   check_answers                            # fails unless every answer is a 200 equal to troupe generate
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fixtures="$root/tests/fixtures"
launch="$(dirname "$troupe")/troupe-launch"
tmp=$(mktemp -d)
pid=""; load=""
cleanup() {  # SIGTERM first: troupe-launch passes it on to its ranks (SIGKILL would orphan them)
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

start_elastic() {  # start_elastic RANKS MAX_RANKS [troupe-launch ARGS]
  local ranks="$1" max="$2"
  shift 2
  printf 'model: %s\nserver: {port: 0, api_key: "sk-test", admin_key: "adm-test"}\nengine: {ranks: %s, block_size: 4, kv_cache_memory: 4MiB, dispatch: round_robin}\nexpert: {mode: llep}\n' \
    "$fixtures/mixtral_moe" "$ranks" >"$tmp/serve.yaml"
  "$launch" --min-ranks 1 --max-ranks "$max" "$@" -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/server.log" 2>&1 &
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
}

start_clients() {  # until stop_clients: 6 threads, each request greedy with 48 new tokens, every other streamed
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
}

stop_clients() {
  touch "$tmp/stop"
  wait "$load"; load=""
  n=$(wc -l <"$tmp/answers.jsonl")
  [ "$n" -ge 20 ] || fail "only $n requests were answered"
}

check_answers() {  # every answer a 200 of 48 tokens, equal to troupe generate
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
}
