#!/usr/bin/env bash
# MEMO under a device budget, end to end through `troupe plan` and `troupe train`:
#   tests/integration/memo_budget.sh TROUPE_BIN
# A. troupe plan --json: MEMO's device bytes are below the no-offload plan's; the budget is set
#    to MEMO's, so the job's activations cannot be held without it.
# B. troupe train with that budget and MEMO on (alpha measured, copies capped at 2 GB/s): every
#    step's loss and every validation loss equal the run without budget and without MEMO
#    (printed digits of the metrics records), with no allocation outside the planned arena.
# C. the same budget without MEMO is refused before the first step, naming what fits.
# D. troupe plan works on every fixture config (dense, GQA, sliding window, tied, MoE).
set -uo pipefail
troupe="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; [ -f "$tmp/log" ] && { echo "--- log:"; tail -40 "$tmp/log"; }; exit 1; }
export TROUPE_NUM_THREADS=1

cat >"$tmp/job.yaml" <<YAML
model:
  create: {preset: tiny, hidden: 64, layers: 6, heads: 4, kv_heads: 2, intermediate: 128, max_position: 256}
data: {train: "$root/examples/data/tinyshakespeare.txt", format: text, val_fraction: 0.05, seed: 3}
batch: {seq_len: 256, micro_batch: 1, global_batch: 2}
optimizer: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, grad_clip: 1.0}
train: {max_steps: 6, eval_every_steps: 3, eval_batches: 2}
checkpoint: {every_steps: 0, keep: 1}
logging: {every_steps: 1}
memory: {memo: {enabled: false, alpha: auto, keep_last_layers: 2, copy_bandwidth_gbps: 2}}
seed: 5
run_dir: "$tmp/run"
YAML
field() { sed -n "s/.*\"$1\": \([0-9.e+-]*\).*/\1/p" "$2" | head -1; }

# A. the plans
"$troupe" plan "$tmp/job.yaml" --json --set memory.memo.enabled=true >"$tmp/memo.json" 2>"$tmp/log" ||
  fail "A: troupe plan (memo) failed"
"$troupe" plan "$tmp/job.yaml" --json >"$tmp/off.json" 2>"$tmp/log" || fail "A: troupe plan (no offload) failed"
memo=$(field device_bytes "$tmp/memo.json"); off=$(field device_bytes "$tmp/off.json")
[ -n "$memo" ] && [ -n "$off" ] || fail "A: no device_bytes in the plans"
[ "$memo" -lt "$off" ] || fail "A: MEMO needs $memo bytes, no offload $off: expected less"
frag=$(field fragmentation "$tmp/memo.json")
awk -v f="$frag" 'BEGIN { exit !(f >= 1 && f <= 1.02) }' || fail "A: plan fragmentation $frag is not in [1, 1.02]"
echo "A: device bytes: MEMO $memo, no offload $off; budget $memo"

# B. MEMO under the budget == no budget, no MEMO
"$troupe" train "$tmp/job.yaml" --no-progress --set run_dir="$tmp/plain" >"$tmp/log" 2>&1 || fail "B: plain run failed"
"$troupe" train "$tmp/job.yaml" --no-progress --set run_dir="$tmp/memo" --set memory.memo.enabled=true \
  --set memory.device_budget="$memo" >"$tmp/log" 2>&1 || fail "B: MEMO run under the budget failed"
grep -q "level-2 peak" "$tmp/log" || fail "B: the memory plan was not printed"
# step, loss and val_loss of every record, as the metrics file printed them
records() {
  sed -n -e 's/.*"kind":"train".*"loss":\([^,}]*\).*"step":\([0-9]*\).*/train \2 \1/p' \
    -e 's/.*"kind":"val".*"step":\([0-9]*\).*"val_loss":\([^,}]*\).*/val \1 \2/p' "$1"
}
records "$tmp/plain/metrics.jsonl" >"$tmp/plain.txt"
records "$tmp/memo/metrics.jsonl" >"$tmp/memo.txt"
[ "$(wc -l <"$tmp/plain.txt")" -eq 9 ] || fail "B: expected 6 train + 3 val records, got $(wc -l <"$tmp/plain.txt")"
diff "$tmp/plain.txt" "$tmp/memo.txt" >/dev/null || { diff "$tmp/plain.txt" "$tmp/memo.txt"; fail "B: losses differ"; }
grep -q '"arena_fallbacks":0' "$tmp/memo/metrics.jsonl" || fail "B: allocations left the planned arena"
grep -q '"memo_host":[1-9]' "$tmp/memo/metrics.jsonl" || fail "B: nothing was swapped to host"
echo "B: $(wc -l <"$tmp/memo.txt") train/val losses identical with MEMO under the budget; 0 arena fallbacks"

# C. no MEMO under the same budget: refused, with the largest seq_len that fits
if "$troupe" train "$tmp/job.yaml" --no-progress --set run_dir="$tmp/refused" \
  --set memory.device_budget="$memo" >"$tmp/log" 2>&1; then
  fail "C: the run without MEMO was not refused"
fi
grep -q "does not fit memory.device_budget" "$tmp/log" || fail "C: no budget error"
grep -q "largest seq_len that fits with these settings is [0-9]" "$tmp/log" || fail "C: the error names no seq_len"
[ ! -f "$tmp/refused/checkpoints/latest" ] || fail "C: a refused run wrote a checkpoint"
echo "C: refused: $(grep -o 'The largest seq_len that fits[^;]*' "$tmp/log" | head -1)"

# D. every fixture config plans
n=0
for f in "$root"/tests/fixtures/*/config.json; do
  d=$(dirname "$f")
  "$troupe" plan "$tmp/job.yaml" --set model.path="$d" --set batch.seq_len=64 --set memory.memo.enabled=true \
    --set memory.device_budget=1GiB >"$tmp/log" 2>&1 || fail "D: troupe plan on $(basename "$d")"
  grep -q "level-2 peak" "$tmp/log" || fail "D: no plan printed for $(basename "$d")"
  n=$((n + 1))
done
[ "$n" -ge 6 ] || fail "D: only $n fixture configs found"
echo "D: troupe plan on $n fixture configs"
echo "PASS"
