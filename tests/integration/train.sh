#!/usr/bin/env bash
# `troupe train` end to end through the real launchers, against single-rank runs:
#   tests/integration/train.sh TROUPE_LAUNCH TROUPE_BIN [MPIRUN]
# A. one rank: metrics.jsonl (start/train/val/checkpoint/summary), checkpoints, the summary.
# B. --resume from the step-4 checkpoint of A's run reproduces A's steps 5..8 exactly.
# C. troupe-launch -n 2, dp 2 (UCX through the supervisor) = one rank with the same global batch.
# D. mpirun -np 2, cp 2 ring (MPI) = one rank on the same sequences (skipped without mpirun).
# E. troupe report draws the SVG.
# F. kill -9 of rank 1 during dp-2 training: the supervisor names it, rank 0 exits with 3,
#    the launcher fails, within a bounded time.
# M. an MoE model with parallel.ep 2 (LLEP) under troupe-launch -n 2 = one rank.
set -uo pipefail
launch="$1"; troupe="$2"; mpirun="${3:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$tmp/log" ] && { echo "--- log:"; tail -60 "$tmp/log"; }; exit 1; }
export TROUPE_NUM_THREADS=1

job() {  # job NAME EXTRA_YAML: writes $tmp/NAME.yaml
  cat >"$tmp/$1.yaml" <<YAML
model:
  create: {preset: tiny, hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64, max_position: 64}
data: {train: "$root/examples/data/tinyshakespeare.txt", format: text, val_fraction: 0.05, seed: 3}
batch: {seq_len: 64, micro_batch: 2, global_batch: 4}
optimizer: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, grad_clip: 1.0}
train: {max_steps: 8, eval_every_steps: 4, eval_batches: 2}
checkpoint: {every_steps: 4, keep: 0}
logging: {every_steps: 1}
seed: 5
run_dir: "$tmp/$1"
$2
YAML
}
# "STEP LOSS" of every train record, one per line (plain sed: no python or jq needed)
losses() { sed -n 's/.*"kind":"train".*"loss":\([^,}]*\).*"step":\([0-9]*\).*/\2 \1/p' "$1"; }
# two loss lists agree step by step within a relative tolerance
close() {
  awk -v tol="$3" 'NR == FNR { a[$1] = $2; n++; next }
    { m++; if (!($1 in a)) { print "step " $1 " missing"; bad = 1; next }
      d = a[$1] - $2; if (d < 0) d = -d; s = a[$1] < 0 ? -a[$1] : a[$1];
      if (d > tol * s) { print "step " $1 ": " a[$1] " vs " $2; bad = 1 } }
    END { if (n == 0 || n != m) { print "counts " n " vs " m; bad = 1 } exit bad }' "$1" "$2"
}

# A. one rank
job single "parallel: {dp: 1}"
"$troupe" train "$tmp/single.yaml" --no-progress >"$tmp/log" 2>&1 || fail "A: single-rank training failed"
grep -q "^run summary" "$tmp/log" || fail "A: no summary printed"
grep -q "val loss at start" "$tmp/log" || fail "A: no initial validation"
m="$tmp/single/metrics.jsonl"
for k in start train val checkpoint summary; do grep -q "\"kind\":\"$k\"" "$m" || fail "A: no $k record"; done
[ -f "$tmp/single/checkpoints/step-00000004/model.safetensors" ] || fail "A: no step-4 checkpoint"
[ "$(cat "$tmp/single/checkpoints/latest")" = "step-00000008" ] || fail "A: latest is not step 8"
losses "$m" >"$tmp/single.loss"
echo "A: one rank: 8 steps, $(grep -c '"kind":"val"' "$m") validations, checkpoints at 4 and 8"

# B. resume from step 4 in a fresh run dir
job resumed "parallel: {dp: 1}"
mkdir -p "$tmp/resumed/checkpoints"
cp -r "$tmp/single/checkpoints/step-00000004" "$tmp/resumed/checkpoints/"
echo step-00000004 >"$tmp/resumed/checkpoints/latest"
"$troupe" train "$tmp/resumed.yaml" --resume --no-progress >"$tmp/log" 2>&1 || fail "B: resume failed"
grep -q "resumed from .*step-00000004 at step 4" "$tmp/log" || fail "B: did not say where it resumed"
losses "$tmp/resumed/metrics.jsonl" >"$tmp/resumed.loss"
tail -4 "$tmp/single.loss" | diff - "$tmp/resumed.loss" >/dev/null || {
  paste "$tmp/single.loss" "$tmp/resumed.loss"; fail "B: resumed losses differ from the uninterrupted run"; }
echo "B: --resume from step 4: steps 5-8 bitwise equal to the uninterrupted run"

# C. dp 2 under troupe-launch (UCX)
job dp2 "parallel: {dp: 2}"
"$launch" -n 2 -- "$troupe" train "$tmp/dp2.yaml" --no-progress >"$tmp/log" 2>&1 || fail "C: dp 2 failed"
grep -q "dp 2 x cp 1, ucx" "$tmp/log" || fail "C: not on UCX with dp 2"
grep -q "rank 1: step 8/8" "$tmp/log" || fail "C: the supervisor did not report rank 1's progress"
losses "$tmp/dp2/metrics.jsonl" >"$tmp/dp2.loss"
close "$tmp/single.loss" "$tmp/dp2.loss" 1e-5 || fail "C: dp 2 losses differ from one rank"
echo "C: troupe-launch -n 2, dp 2 (ucx): losses equal one rank's within 1e-5"

# M. an MoE model (model.create.experts) with its experts over 2 ranks: parallel.ep 2, LLEP planning
#    at every imbalance (lambda 1), under troupe-launch (UCX) = one rank with the same global batch
moe_job() {  # moe_job NAME EXTRA_YAML: job, with 8 experts (top-2) in every layer
  job "$1" "$2"
  sed -i 's/max_position: 64}/max_position: 64, experts: 8, experts_per_token: 2, expert_intermediate: 48}/' "$tmp/$1.yaml"
}
moe_job moe1 "parallel: {dp: 1}"
"$troupe" train "$tmp/moe1.yaml" --no-progress >"$tmp/log" 2>&1 || fail "M: single-rank MoE training failed"
losses "$tmp/moe1/metrics.jsonl" >"$tmp/moe1.loss"
moe_job moe2 "parallel: {dp: 2, ep: 2, expert: {mode: llep, lambda: 1.0, min_chunk: 64}}"
"$launch" -n 2 -- "$troupe" train "$tmp/moe2.yaml" --no-progress >"$tmp/log" 2>&1 || fail "M: MoE with ep 2 failed"
grep -q "dp 2 x cp 1, ep 2 llep, ucx" "$tmp/log" || fail "M: not expert parallel (ep 2 llep) on UCX"
losses "$tmp/moe2/metrics.jsonl" >"$tmp/moe2.loss"
close "$tmp/moe1.loss" "$tmp/moe2.loss" 1e-5 || fail "M: ep 2 losses differ from one rank"
echo "M: troupe-launch -n 2, MoE with ep 2 (llep, ucx): losses equal one rank's within 1e-5"
# ... and with the supervisor moving experts between the ranks when their load stays skewed
moe_job moe3 "parallel: {dp: 2, ep: 2, expert: {mode: ep, rebalance: {enabled: true, threshold: 1.05, patience: 2}}}"
"$launch" -n 2 -- "$troupe" train "$tmp/moe3.yaml" --no-progress >"$tmp/log" 2>&1 || fail "M: MoE with rebalancing failed"
grep -q "expert balancer: layer . placement v1" "$tmp/log" || fail "M: the supervisor never changed the placement"
grep -q "moved to expert placement v1" "$tmp/log" || fail "M: the ranks never switched placement"
losses "$tmp/moe3/metrics.jsonl" >"$tmp/moe3.loss"
close "$tmp/moe1.loss" "$tmp/moe3.loss" 1e-5 || fail "M: rebalanced ep 2 losses differ from one rank"
echo "M: ... with supervisor rebalancing ($(grep -c 'moved to expert placement' "$tmp/log") placement switches): losses equal one rank's"

# D. cp 2 (ring) under mpirun (MPI)
if [ -n "$mpirun" ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
    OMPI_MCA_btl_vader_single_copy_mechanism=none
  job cp2 "parallel: {dp: 1, cp: 2, cp_mode: ring}"
  timeout 120 "$mpirun" --oversubscribe -np 2 "$troupe" train "$tmp/cp2.yaml" --no-progress >"$tmp/log" 2>&1 \
    || fail "D: cp 2 under mpirun failed"
  grep -q "dp 1 x cp 2, mpi" "$tmp/log" || fail "D: not on MPI with cp 2"
  losses "$tmp/cp2/metrics.jsonl" >"$tmp/cp2.loss"
  close "$tmp/single.loss" "$tmp/cp2.loss" 1e-5 || fail "D: cp 2 losses differ from one rank"
  echo "D: mpirun -np 2, cp 2 ring (mpi): losses equal one rank's within 1e-5"
else
  echo "D: skipped (no mpirun)"
fi

# E. the report
"$troupe" report "$tmp/single" >"$tmp/log" 2>&1 || fail "E: troupe report failed"
head -c 200 "$tmp/single/report.svg" | grep -q "<svg" || fail "E: no SVG"
echo "E: troupe report wrote $(wc -c <"$tmp/single/report.svg") bytes of SVG"

# F. kill -9 of rank 1 in the middle of dp-2 training
job long "parallel: {dp: 2}"
sed -i 's/max_steps: 8/max_steps: 100000/; s/every_steps: 4, keep: 0/every_steps: 0, keep: 1/' "$tmp/long.yaml"
: >"$tmp/log"
TROUPE_LOG_LEVEL=info "$launch" -n 2 --settle-ms 3000 --grace-ms 2000 -- "$troupe" train "$tmp/long.yaml" \
  --no-progress --heartbeat-timeout-ms 3000 >"$tmp/log" 2>&1 &
lpid=$!; pids+=("$lpid")
for _ in $(seq 600); do grep -q '"kind":"train"' "$tmp/long/metrics.jsonl" 2>/dev/null && break; sleep 0.1; done
victim=$(sed -n 's/.*supervisor: rank 1 joined (pid \([0-9]*\) .*/\1/p' "$tmp/log" | head -1)
[ -n "$victim" ] || fail "F: no pid for rank 1"
kill -9 "$victim"; t0=$(date +%s)
for _ in $(seq 400); do kill -0 "$lpid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$lpid" 2>/dev/null && fail "F: still running 40 s after rank 1 was killed"
wait "$lpid"; rc=$?
[ "$rc" -ne 0 ] || fail "F: the launcher exited 0"
grep -q "supervisor: rank 1 (pid $victim on .*) lost" "$tmp/log" || fail "F: the supervisor did not name rank 1"
grep -Eq "troupe-launch: rank 0 (exited|failed): exit code 3" "$tmp/log" || fail "F: rank 0 did not exit with 3"
echo "F: kill -9 of rank 1 (pid $victim) during training: reported, rank 0 exited 3, $(( $(date +%s) - t0 )) s"
echo "PASS"
