#!/usr/bin/env bash
# The `troupe` command line as a user meets it:
#   tests/integration/cli.sh TROUPE_BIN
# A. an unknown subcommand (or a bad option) is an error naming it, exit 2; --version exits 0;
#    troupe scale with no server there exits 3 naming the address.
# B. troupe inspect: exit 0 on a whole checkpoint; non-zero, naming the first missing tensor, on a
#    checkpoint that does not match its config.json.
# C. troupe generate: greedy by default; --temperature/--top-p/--seed sample, the same seed gives
#    the same tokens and another seed other tokens; bad sampling values are refused naming the flag.
set -uo pipefail
troupe="$1"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$troupe" rescale http://127.0.0.1:8000 --ranks 2 >"$tmp/out" 2>&1; rc=$?
[ "$rc" = 2 ] || fail "A: an unknown subcommand exited $rc"
grep -q "'rescale' is not a troupe command" "$tmp/out" || fail "A: unclear: $(cat "$tmp/out")"
"$troupe" scale http://127.0.0.1:1 --ranks 2 >"$tmp/out" 2>&1; rc=$?
[ "$rc" = 3 ] || fail "A: troupe scale with no server exited $rc"
grep -q "no answer from http://127.0.0.1:1" "$tmp/out" || fail "A: troupe scale: unclear: $(cat "$tmp/out")"
"$troupe" info --no-such-flag >"$tmp/out" 2>&1; rc=$?
[ "$rc" = 2 ] || fail "A: an unknown option exited $rc"
"$troupe" --version >/dev/null || fail "A: --version failed"
echo "A: unknown subcommand / option -> exit 2 with the reason; --version -> 0"

"$troupe" init "$tmp/m" --preset tiny-llama >/dev/null 2>&1 || fail "B: troupe init"
"$troupe" inspect "$tmp/m" >"$tmp/out" 2>&1 || fail "B: inspect of a whole checkpoint failed: $(cat "$tmp/out")"
grep -q "check:      ok" "$tmp/out" || fail "B: no ok line"
cp -r "$tmp/m" "$tmp/bad"
python3 - "$tmp/bad/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] += 1; json.dump(c, open(sys.argv[1], "w"))
PY
"$troupe" inspect "$tmp/bad" >"$tmp/out" 2>&1; rc=$?
[ "$rc" != 0 ] || fail "B: inspect of a mismatched checkpoint exited 0"
grep -q "does not match its config.json" "$tmp/out" || fail "B: unclear: $(cat "$tmp/out")"
echo "B: inspect: exit 0 when whole, $rc when a layer is missing"

g() { "$troupe" generate "$tmp/m" --prompt-ids 1,2,3,4 --max-new-tokens 12 "$@" 2>/dev/null; }
greedy1=$(g); greedy2=$(g)
[ -n "$greedy1" ] && [ "$greedy1" = "$greedy2" ] || fail "C: greedy is not repeatable"
a=$(g --temperature 1.0 --top-p 0.95 --seed 11); b=$(g --temperature 1.0 --top-p 0.95 --seed 11)
c=$(g --temperature 1.0 --top-p 0.95 --seed 12)
[ -n "$a" ] && [ "$a" = "$b" ] || fail "C: the same seed gave $a and $b"
[ "$a" != "$c" ] || fail "C: seeds 11 and 12 gave the same tokens $a"
[ "$(echo "$a" | tr ',' '\n' | wc -l)" = 12 ] || fail "C: not 12 tokens: $a"
"$troupe" generate "$tmp/m" --prompt-ids 1,2 --temperature 3 >"$tmp/out" 2>&1 && fail "C: temperature 3 accepted"
grep -q -- "--temperature" "$tmp/out" || fail "C: the refusal does not name --temperature: $(cat "$tmp/out")"
echo "C: generate: greedy repeatable, seeded sampling repeatable and seed-dependent, bad values refused"
echo "cli: all checks passed"
