#!/usr/bin/env bash
# `troupe serve` end to end with curl on 127.0.0.1 (the server started and stopped here, by PID):
#   tests/integration/serve.sh TROUPE_BIN [MPIRUN]
# A. dense (llama_gqa) and MoE (mixtral_moe) fixtures: greedy /v1/completions over HTTP equal
#    `troupe generate` token for token (which generate_test checks against transformers).
# B. stream: true — the SSE deltas concatenate to the same text, then [DONE].
# C. /v1/chat/completions, /v1/models, /health, /metrics (TTFT/TPOT histograms, KV, prefix hits).
# D. bad input: malformed JSON, a bad field, a missing API key, a token id outside the vocabulary
#    -> 4xx with an OpenAI error object; the server keeps serving.
# E. a client that leaves mid-stream, and one that leaves before a non-streamed answer: each
#    request is aborted and its KV blocks freed.
# I. the OpenAI API on the MoE fixture: a seeded sampled request = `troupe generate --seed` with the
#    same parameters; n choices; echo with logprobs; best_of; an unknown model is 404
#    model_not_found, an unknown parameter a 400 naming it, a GET on a POST route 405 and an
#    unknown route 404, each a JSON error object.
# F. two expert-parallel ranks under troupe-launch with attention replicated (engine.ranks: 2,
#    each rank holding half the experts, LLEP): greedy over HTTP = troupe generate on one rank,
#    streamed too; /metrics shows 2 ranks and per-expert loads; SIGTERM to the launcher stops both
#    ranks cleanly; engine.ranks different from the launched ranks, or a dense model with replicated
#    attention, is refused naming why.
# J. two ranks with data-parallel attention (the default: each rank its own requests and KV cache,
#    round-robin dispatch so both serve): concurrent greedy requests, streamed and not, = troupe
#    generate whichever rank serves them; /metrics shows both ranks' dispatches; a dense model runs on
#    two ranks as two replicas.
# G. (with MPIRUN) the same two ranks under mpirun: greedy = troupe generate; SIGTERM stops them.
# H. two ranks with the supervisor's expert rebalancing on (a hair trigger): the experts move
#    between ranks while serving (the log says so) and greedy output still = troupe generate.
#    (the server: printf-made serve.yaml, a free port printed at start, SIGTERM at the end)
set -uo pipefail
troupe="$1"; mpirun="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fixtures="$root/tests/fixtures"
tmp=$(mktemp -d)
pid=""
cleanup() {  # SIGTERM first: troupe-launch passes it on to its ranks (SIGKILL would orphan them)
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
export TROUPE_NUM_THREADS=1

launch="$(dirname "$troupe")/troupe-launch"
write_yaml() {  # write_yaml MODEL_DIR [EXTRA_YAML] [RANKS] [ENGINE_EXTRA] -> $tmp/serve.yaml
  printf 'model: %s\nserver: {port: 0, api_key: "sk-test"}\nengine: {ranks: %s, block_size: 4, kv_cache_memory: 4MiB%s}\n%s\n' \
    "$1" "${3:-1}" "${4:-}" "${2:-}" >"$tmp/serve.yaml"
}
start() {  # start MODEL_DIR [EXTRA_YAML] [RANKS] [ENGINE_EXTRA]: a server on a free port; sets $pid, $ranks and $url
  write_yaml "$@"
  ranks="${3:-1}"
  if [ "$ranks" -gt 1 ] && [ -n "${use_mpirun:-}" ]; then
    "$mpirun" --oversubscribe -np "$ranks" "$troupe" serve "$tmp/serve.yaml" >"$tmp/server.log" 2>&1 &
  elif [ "$ranks" -gt 1 ]; then
    [ -x "$launch" ] || fail "no troupe-launch next to $troupe"
    "$launch" -n "$ranks" -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/server.log" 2>&1 &
  else
    "$troupe" serve "$tmp/serve.yaml" >"$tmp/server.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 1 200); do  # troupe-launch prefixes "[rank 0] "
    port=$(sed -n 's/^\(\[rank 0\] \)\{0,1\}troupe serve: .* on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\2/p' "$tmp/server.log")
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || fail "the server exited at start"
    sleep 0.1
  done
  [ -n "$port" ] || fail "the server did not print its port"
  url="http://127.0.0.1:$port"
}
stop() {  # SIGTERM (to the launcher, which signals every rank); every rank must exit 0
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "the server did not stop on SIGTERM"
  if [ "$ranks" -gt 1 ] && [ -n "${use_mpirun:-}" ]; then
    wait "$pid"  # mpirun reports the signal in its own code
    grep -q "troupe serve: stopped" "$tmp/server.log" || fail "rank 0 did not stop cleanly under mpirun"
    grep -q "exit code [1-9]" "$tmp/server.log" && fail "a rank failed under mpirun"
  elif [ "$ranks" -gt 1 ]; then
    wait "$pid"  # troupe-launch reports the forwarded signal in its own code
    for r in $(seq 0 $((ranks - 1))); do
      grep -q "rank $r exited: exit code 0" "$tmp/server.log" || fail "rank $r did not stop cleanly"
    done
  else
    wait "$pid" || fail "the server exited with an error"
  fi
  pid=""
}
post() {  # post PATH JSON -> body on stdout, status in $tmp/status
  curl -s -o "$tmp/body" -w '%{http_code}' -H 'Authorization: Bearer sk-test' -H 'Content-Type: application/json' \
    -d "$2" "$url$1" >"$tmp/status"
  cat "$tmp/body"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# the concatenated SSE deltas in $tmp/sse -> comma-separated ids
sse_ids() {
  python3 -c "
import json
text = ''
for line in open('$tmp/sse'):
    if line.startswith('data: {'):
        text += json.loads(line[6:])['choices'][0]['text']
print(','.join(str(ord(c)) for c in text))"
}
# the byte tokenizer's text of a completion -> comma-separated ids (the fixtures' ids are < 128)
ids_of_text() { python3 -c "import json,sys; print(','.join(str(ord(c)) for c in json.load(sys.stdin)['choices'][0]['text']))"; }

for model in llama_gqa mixtral_moe; do
  start "$fixtures/$model"
  prompt="3,17,99,4,4,60,1,2"
  want=$("$troupe" generate "$fixtures/$model" --prompt-ids "$prompt" --max-new-tokens 12 2>/dev/null)
  got=$(post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 12, \"temperature\": 0}" | ids_of_text)
  [ "$(cat "$tmp/status")" = 200 ] || fail "A $model: status $(cat "$tmp/status"): $(cat "$tmp/body")"
  [ "$got" = "$want" ] || fail "A $model: HTTP greedy $got != troupe generate $want"
  echo "A: $model: greedy over HTTP = troupe generate ($want)"

  # B. the same request streamed
  curl -sN -H 'Authorization: Bearer sk-test' -d "{\"prompt\": [$prompt], \"max_tokens\": 12, \"temperature\": 0, \"stream\": true}" \
    "$url/v1/completions" >"$tmp/sse"
  grep -q '^data: \[DONE\]' "$tmp/sse" || fail "B $model: no [DONE]"
  streamed=$(sse_ids)
  [ "$streamed" = "$want" ] || fail "B $model: streamed $streamed != $want"
  echo "B: $model: streamed deltas = the same tokens, then [DONE]"
  [ "$model" = mixtral_moe ] || stop
done

# C. chat, models, health, metrics (on the MoE server still running)
post /v1/chat/completions '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "seed": 1}' >"$tmp/chat"
[ "$(cat "$tmp/status")" = 200 ] || fail "C: chat status $(cat "$tmp/status")"
[ "$(json "d['object']" <"$tmp/chat")" = chat.completion ] || fail "C: not a chat.completion"
[ "$(json "d['usage']['completion_tokens']" <"$tmp/chat")" = 4 ] || fail "C: chat did not make 4 tokens"
curl -sf -H 'Authorization: Bearer sk-test' "$url/v1/models" | grep -q '"id":"mixtral_moe"' || fail "C: /v1/models"
curl -sf "$url/health" | grep -q ok || fail "C: /health"
curl -sf "$url/metrics" >"$tmp/metrics" || fail "C: /metrics"
for m in troupe_time_to_first_token_seconds_bucket troupe_time_per_output_token_seconds_count troupe_requests_waiting \
         troupe_kv_cache_usage troupe_prefix_cache_hit_rate troupe_http_responses_total; do
  grep -q "^$m" "$tmp/metrics" || fail "C: /metrics lacks $m"
done
echo "C: chat, /v1/models, /health and /metrics answer"

# D. bad input
code() { cat "$tmp/status"; }
post /v1/completions '{"prompt": "x", ' >/dev/null; [ "$(code)" = 400 ] || fail "D: malformed JSON got $(code)"
[ "$(json "d['error']['type']" <"$tmp/body")" = invalid_request_error ] || fail "D: no OpenAI error object"
post /v1/completions '{"prompt": "x", "temperature": 9}' >/dev/null; [ "$(code)" = 400 ] || fail "D: temperature 9 got $(code)"
[ "$(json "d['error']['param']" <"$tmp/body")" = temperature ] || fail "D: the error does not name temperature"
post /v1/completions '{"prompt": [1, 5000]}' >/dev/null; [ "$(code)" = 400 ] || fail "D: token 5000 got $(code)"
c=$(curl -s -o /dev/null -w '%{http_code}' -d '{"prompt": "x"}' "$url/v1/completions")
[ "$c" = 401 ] || fail "D: no API key got $c"
post /v1/completions '{"prompt": [1, 2], "max_tokens": 2}' >/dev/null; [ "$(code)" = 200 ] || fail "D: the server stopped serving"
echo "D: malformed JSON, bad field, bad token id -> 400, no key -> 401, and it still serves"

# I. the OpenAI API
want=$("$troupe" generate "$fixtures/mixtral_moe" --prompt-ids "$prompt" --max-new-tokens 10 --temperature 0.8 \
       --top-p 0.9 --seed 5 2>/dev/null)
got=$(post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 10, \"temperature\": 0.8, \"top_p\": 0.9,
                             \"seed\": 5, \"ignore_eos\": true}" | ids_of_text)
[ "$got" = "$want" ] || fail "I: seeded sampling over HTTP $got != troupe generate --seed 5 $want"
post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 3, \"temperature\": 0, \"n\": 3, \"echo\": true,
                      \"logprobs\": 2}" >"$tmp/n"
[ "$(code)" = 200 ] || fail "I: n/echo/logprobs got $(code): $(cat "$tmp/body")"
[ "$(json "len(d['choices'])" <"$tmp/n")" = 3 ] || fail "I: n=3 did not give 3 choices"
[ "$(json "len(set(c['text'] for c in d['choices']))" <"$tmp/n")" = 1 ] || fail "I: greedy choices differ"
[ "$(json "len(d['choices'][2]['logprobs']['tokens'])" <"$tmp/n")" = 11 ] || fail "I: echo logprobs: not 8 + 3 tokens"
[ "$(json "d['choices'][0]['logprobs']['token_logprobs'][0]" <"$tmp/n")" = None ] || fail "I: echo's first logprob"
[ "$(json "d['usage']['prompt_tokens']" <"$tmp/n")" = 8 ] || fail "I: usage counts the prompt once"
post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 4, \"best_of\": 3, \"seed\": 2}" >"$tmp/best"
[ "$(code)" = 200 ] && [ "$(json "len(d['choices'])" <"$tmp/best")" = 1 ] || fail "I: best_of 3 got $(code)"
post /v1/completions '{"prompt": "x", "model": "gpt-4"}' >/dev/null
[ "$(code)" = 404 ] && [ "$(json "d['error']['code']" <"$tmp/body")" = model_not_found ] || fail "I: unknown model got $(code)"
post /v1/completions '{"prompt": "x", "mirostat": 1}' >/dev/null
[ "$(code)" = 400 ] && [ "$(json "d['error']['param']" <"$tmp/body")" = mirostat ] || fail "I: unknown parameter got $(code)"
c=$(curl -s -o "$tmp/body" -w '%{http_code}' -H 'Authorization: Bearer sk-test' "$url/v1/completions")
[ "$c" = 405 ] && json "d['error']['message']" <"$tmp/body" >/dev/null || fail "I: GET /v1/completions got $c"
c=$(curl -s -o "$tmp/body" -w '%{http_code}' "$url/v2/nothing")
[ "$c" = 404 ] && json "d['error']['message']" <"$tmp/body" >/dev/null || fail "I: an unknown route got $c"
echo "I: seeded sampling = troupe generate --seed, n, echo + logprobs, best_of, 404 model / 400 parameter / 405 / 404"

stop

# E. a client leaving mid-stream (a model with a 2048-token context, so the stream outlasts curl)
"$troupe" init "$tmp/tiny" --preset tiny-mixtral >/dev/null 2>&1 || fail "E: troupe init failed"
start "$tmp/tiny"
leave_early() {  # leave_early STREAM N WHAT: a client gives up after 0.3 s; the N-th disconnect must free everything
  curl -sN --max-time 0.3 -H 'Authorization: Bearer sk-test' \
    -d "{\"prompt\": [1, 2, 3], \"max_tokens\": 1000, \"stream\": $1, \"ignore_eos\": true}" "$url/v1/completions" >/dev/null
  for _ in $(seq 1 50); do
    curl -s "$url/metrics" >"$tmp/metrics"
    grep -q "^troupe_http_client_disconnects_total $2" "$tmp/metrics" && grep -q '^troupe_requests_running 0' "$tmp/metrics" \
      && grep -q '^troupe_kv_cache_usage 0$' "$tmp/metrics" && break
    sleep 0.1
  done
  grep -q "^troupe_http_client_disconnects_total $2" "$tmp/metrics" || fail "E: $3: the disconnect was not noticed"
  grep -q '^troupe_kv_cache_usage 0$' "$tmp/metrics" || fail "E: $3: the aborted request still holds KV blocks"
}
leave_early true 1 "mid-stream"
echo "E: a client leaving mid-stream: request aborted, KV blocks freed"
leave_early false 2 "before a non-streamed answer"
echo "E: a client leaving before a non-streamed answer: request aborted, KV blocks freed"
stop

# F. two ranks
write_yaml "$fixtures/mixtral_moe" "" 2
"$troupe" serve "$tmp/serve.yaml" >"$tmp/refused.log" 2>&1 && fail "F: engine.ranks 2 on one rank was accepted"
grep -q "engine.ranks = 2, but troupe serve was launched on 1 rank" "$tmp/refused.log" \
  || fail "F: unclear refusal: $(cat "$tmp/refused.log")"
write_yaml "$fixtures/llama_gqa" "" 2 ", attention: replicated"
"$launch" -n 2 -- "$troupe" serve "$tmp/serve.yaml" >"$tmp/refused.log" 2>&1 && fail "F: a dense model on 2 replicated ranks was accepted"
grep -q "is a dense model" "$tmp/refused.log" || fail "F: unclear dense refusal: $(cat "$tmp/refused.log")"
start "$fixtures/mixtral_moe" "" 2 ", attention: replicated"
grep -q "2 rank(s) (experts 2 per rank, llep)" "$tmp/server.log" || fail "F: not 2 ranks with 2 experts each"
prompt="3,17,99,4,4,60,1,2"
want=$("$troupe" generate "$fixtures/mixtral_moe" --prompt-ids "$prompt" --max-new-tokens 12 2>/dev/null)
got=$(post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 12, \"temperature\": 0}" | ids_of_text)
[ "$(cat "$tmp/status")" = 200 ] || fail "F: status $(cat "$tmp/status"): $(cat "$tmp/body")"
[ "$got" = "$want" ] || fail "F: two-rank greedy $got != troupe generate $want"
# a second prompt and a stream, at once
curl -sN -H 'Authorization: Bearer sk-test' \
  -d "{\"prompt\": [$prompt], \"max_tokens\": 12, \"temperature\": 0, \"stream\": true}" "$url/v1/completions" >"$tmp/sse" &
other=$(post /v1/completions '{"prompt": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], "max_tokens": 9, "temperature": 0}' | ids_of_text)
want_other=$("$troupe" generate "$fixtures/mixtral_moe" --prompt-ids 5,6,7,8,9,10,11,12,13,14,15 --max-new-tokens 9 2>/dev/null)
wait $!
[ "$other" = "$want_other" ] || fail "F: two-rank greedy (second prompt) $other != $want_other"
streamed=$(sse_ids)
[ "$streamed" = "$want" ] || fail "F: two-rank stream $streamed != $want"
curl -sf "$url/metrics" >"$tmp/metrics" || fail "F: /metrics"
grep -q '^troupe_engine_ranks 2$' "$tmp/metrics" || fail "F: /metrics does not say 2 ranks"
rows=$(sed -n 's/^troupe_expert_load_rows_total{layer="[0-9]*",expert="[0-9]*"} \([0-9]*\)$/\1/p' "$tmp/metrics" \
       | awk '{s += $1} END {print s + 0}')
[ -n "$rows" ] && [ "$rows" -gt 0 ] || fail "F: no per-expert loads in /metrics"
echo "F: two ranks: greedy and streamed = troupe generate, $rows expert rows in /metrics"
stop
echo "F: SIGTERM stopped both ranks cleanly"

# J. data-parallel attention
for model in mixtral_moe llama_gqa; do
  start "$fixtures/$model" "" 2 ", dispatch: round_robin"
  grep -q "data-parallel attention, dispatch round_robin" "$tmp/server.log" || fail "J $model: not data-parallel"
  prompts=("3,17,99,4,4,60,1,2" "5,6,7,8,9,10,11,12,13,14,15" "40,41,42" "3,17,99,4,4,60,1,2,7,7")
  pids=()
  for i in "${!prompts[@]}"; do
    if [ $((i % 2)) = 0 ]; then
      curl -s -H 'Authorization: Bearer sk-test' -d "{\"prompt\": [${prompts[$i]}], \"max_tokens\": 10, \"temperature\": 0}" \
        "$url/v1/completions" >"$tmp/j$i.json" &
    else
      curl -sN -H 'Authorization: Bearer sk-test' \
        -d "{\"prompt\": [${prompts[$i]}], \"max_tokens\": 10, \"temperature\": 0, \"stream\": true}" \
        "$url/v1/completions" >"$tmp/j$i.sse" &
    fi
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for i in "${!prompts[@]}"; do
    want_j=$("$troupe" generate "$fixtures/$model" --prompt-ids "${prompts[$i]}" --max-new-tokens 10 2>/dev/null)
    if [ $((i % 2)) = 0 ]; then got=$(ids_of_text <"$tmp/j$i.json"); else cp "$tmp/j$i.sse" "$tmp/sse"; got=$(sse_ids); fi
    [ "$got" = "$want_j" ] || fail "J $model: request $i over the data-parallel group $got != troupe generate $want_j"
  done
  curl -sf "$url/metrics" >"$tmp/metrics" || fail "J: /metrics"
  grep -q '^troupe_dp_dispatched_total{rank="1"} 2$' "$tmp/metrics" || fail "J $model: rank 1 did not serve 2 requests"
  grep -q '^troupe_engine_ranks 2$' "$tmp/metrics" || fail "J $model: /metrics does not say 2 ranks"
  stop
  echo "J: $model on 2 data-parallel ranks: 4 concurrent requests (2 streamed) = troupe generate, 2 served by rank 1"
done

# H. rebalancing while serving
start "$fixtures/mixtral_moe" \
  "expert: {rebalance: {enabled: true, threshold: 1.05, patience: 1, cooldown: 2, min_improvement: 0.01}}" 2
for p in "$prompt" "5,6,7,8,9,10,11,12,13,14,15" "$prompt"; do
  got=$(post /v1/completions "{\"prompt\": [$p], \"max_tokens\": 40, \"temperature\": 0}" | ids_of_text)
  want_h=$("$troupe" generate "$fixtures/mixtral_moe" --prompt-ids "$p" --max-new-tokens 40 2>/dev/null)
  [ "$got" = "$want_h" ] || fail "H: greedy with rebalancing $got != troupe generate $want_h"
done
moves=$(grep -c "moved to expert placement" "$tmp/server.log")
[ "$moves" -ge 1 ] || fail "H: no expert placement change while serving"
stop
echo "H: rebalancing while serving: $moves placement changes, greedy = troupe generate"

# G. mpirun
if [ -n "$mpirun" ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
         OMPI_MCA_btl_vader_single_copy_mechanism=none
  use_mpirun=1
  start "$fixtures/mixtral_moe" "" 2
  got=$(post /v1/completions "{\"prompt\": [$prompt], \"max_tokens\": 12, \"temperature\": 0}" | ids_of_text)
  [ "$(cat "$tmp/status")" = 200 ] || fail "G: status $(cat "$tmp/status"): $(cat "$tmp/body")"
  [ "$got" = "$want" ] || fail "G: mpirun greedy $got != troupe generate $want"
  stop
  echo "G: mpirun -np 2: greedy = troupe generate, stopped by SIGTERM"
fi
echo "serve: all checks passed"
