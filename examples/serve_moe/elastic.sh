#!/usr/bin/env bash
# Starts examples/serve_moe/elastic.yaml as an elastic group of up to 4 processes (troupe-launch
# --min-ranks 1 --max-ranks 4), keeps asking it with curl while `troupe scale` takes it from 1 to 2,
# 4, 2 and back to 1 rank, prints what each change took and the scale events of /metrics, and stops it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
troupe="${TROUPE:-build/launch/troupe}"
launch="$(dirname "$troupe")/troupe-launch"
[ -x "$troupe" ] && [ -x "$launch" ] || { echo "build troupe first (scripts/quickstart or scripts/test)"; exit 1; }
mkdir -p runs/serve_moe
[ -f runs/serve_moe/model/config.json ] || "$troupe" init runs/serve_moe/model --preset tiny-mixtral >/dev/null
port="${PORT:-8000}"
export TROUPE_ADMIN_KEY="${TROUPE_ADMIN_KEY:-elastic-example}"
TROUPE_NUM_THREADS="${TROUPE_NUM_THREADS:-1}" "$launch" --min-ranks 1 --max-ranks 4 -- \
  "$troupe" serve examples/serve_moe/elastic.yaml --set server.port="$port" >runs/serve_moe/elastic.log 2>&1 &
pid=$!
asker=""
trap 'kill "$asker" 2>/dev/null || true; kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q "troupe serve: .* on http" runs/serve_moe/elastic.log && break; sleep 0.1; done
grep "troupe serve:" runs/serve_moe/elastic.log || { cat runs/serve_moe/elastic.log; exit 1; }
url="http://127.0.0.1:$port"
prompt='{"prompt": "ROMEO:\nBut soft, what light", "max_tokens": 64, "temperature": 0}'
first=$(curl -s "$url/v1/completions" -H 'Content-Type: application/json' -d "$prompt")
( while true; do curl -s "$url/v1/completions" -H 'Content-Type: application/json' -d "$prompt" >runs/serve_moe/last.json; done ) &
asker=$!
for m in 2 4 2 1; do
  sleep 1
  "$troupe" scale "$url" --ranks "$m"
done
kill "$asker"; asker=""
last=$(curl -s "$url/v1/completions" -H 'Content-Type: application/json' -d "$prompt")
python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print('the same answer before and after:', a['choices'][0]['text']==b['choices'][0]['text'])" "$first" "$last"
curl -s "$url/metrics" | grep '^troupe_scale'
kill -TERM "$pid"; wait "$pid" || true
