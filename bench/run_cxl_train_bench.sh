#!/usr/bin/env bash
# bench/run_cxl_train_bench.sh — training step time under an emulated CXL tier (issue #6): the same
# `troupe train` job with the host placement policies latency_first, interleave_all, cxl_only and
# dram_only (memory.placement, via --set), interleaved round by round in one session. Prints a
# markdown table: tokens/s of the fastest step after WARMUP over all rounds (on a shared machine the
# median mostly measures the other load) and the median of the per-round medians, each with its
# ratio to dram_only measured in the same run.
#
#   bench/run_cxl_train_bench.sh                                   # build/, 2 threads
#   BUILD=build-int STEPS=12 ROUNDS=3 EMU_GBPS=0.5 EMU_NS=250 bench/run_cxl_train_bench.sh
#
# The machine needs no CXL: the job declares a dram tier and an emulated cxl tier, both on NUMA
# node 0 (memory.tiers; the cxl tier carries emulated_gbps / emulated_latency_ns). The emulation
# makes the CPU AdamW wait out bytes-on-CXL / EMU_GBPS + EMU_NS per block (runtime/tier_registry.h);
# the forward/backward is not slowed. Every figure this prints is EMULATED.
# latency_first uses a local DRAM budget of 3.5 state groups (momentum, variance and master grads
# local, the master weights straddle), as in the paper's worked example.
# The model: vocab 258, hidden 512, 4 layers, 8 heads / 4 kv heads, intermediate 1376 (~13.9M
# parameters, 16 B/param of fp32 state on the tiers), seq_len 64, micro batch 1: a step where the
# optimizer's share of the time is large, as in ZeRO-Offload.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
THREADS=${THREADS:-2}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-3}
EMU_GBPS=${EMU_GBPS:-0.5}
EMU_NS=${EMU_NS:-250}
POLICIES=${POLICIES:-"dram_only latency_first interleave_all cxl_only"}
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS TROUPE_NUM_THREADS=$THREADS
TROUPE=$BUILD/launch/troupe
[ -x "$TROUPE" ] || TROUPE=$BUILD/troupe
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

cat > "$TMP/job.yaml" <<EOF
model:
  create: {preset: tiny, vocab: 258, hidden: 512, layers: 4, heads: 8, kv_heads: 4, intermediate: 1376, max_position: 64}
data: {train: examples/data/tinyshakespeare.txt, format: text, val_fraction: 0.01, seed: 1}
batch: {seq_len: 64, micro_batch: 1, grad_accum: 1}
optimizer: {lr: 1.0e-3, warmup_steps: 1}
train: {max_steps: $STEPS, eval_every_steps: 0, eval_batches: 1}
checkpoint: {every_steps: 0, keep: 0}
logging: {every_steps: 1}
memory:
  tiers:
    - {name: dram, kind: dram, numa_nodes: [0], capacity: 4GiB}
    - {name: cxl, kind: cxl, numa_nodes: [0], capacity: 4GiB, emulated_gbps: $EMU_GBPS, emulated_latency_ns: $EMU_NS}
EOF

# One state group's bytes, from the plan the trainer will use.
GROUP=$("$TROUPE" plan "$TMP/job.yaml" --json | python3 -c \
  'import json,sys; j=json.load(sys.stdin); print(j["host_placement"]["groups"][0]["bytes"])')
BUDGET=$((GROUP * 7 / 2))
echo "state group: $GROUP bytes; latency_first local_dram_budget: $BUDGET bytes" >&2
"$TROUPE" plan "$TMP/job.yaml" --set memory.local_dram_budget=$BUDGET | sed -n '/host placement/,$p' >&2

for r in $(seq 1 "$ROUNDS"); do
  for p in $POLICIES; do
    "$TROUPE" train "$TMP/job.yaml" --no-progress --set memory.placement=$p \
      --set memory.local_dram_budget=$BUDGET --set run_dir="$TMP/$p-$r" > "$TMP/$p-$r.log" 2>&1 ||
      { cat "$TMP/$p-$r.log" >&2; exit 1; }
  done
done

python3 - "$TMP" "$ROUNDS" "$WARMUP" "$EMU_GBPS" "$EMU_NS" $POLICIES <<'EOF'
import json, statistics, sys
tmp, rounds, warmup, gbps, ns, policies = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:]
fig = {}
for p in policies:
    meds, alls = [], []
    for r in range(1, rounds + 1):
        recs = [json.loads(l) for l in open(f"{tmp}/{p}-{r}/metrics.jsonl")]
        tps = [x["tokens_per_s"] for x in recs if x.get("kind") == "train" and x["step"] > warmup]
        meds.append(statistics.median(tps))
        alls += tps
    fig[p] = (max(alls), statistics.median(meds))
print(f"emulated CXL tier: {gbps} GB/s cap, +{ns} ns per access block (EMULATED)")
print("| placement | tokens/s, fastest step | vs dram_only | tokens/s, median of round medians | vs dram_only |")
print("|---|---|---|---|---|")
base = fig.get("dram_only")
for p in policies:
    b, m = fig[p]
    rb = f"{b / base[0]:.3f}" if base else "-"
    rm = f"{m / base[1]:.3f}" if base else "-"
    print(f"| {p} | {b:.0f} | {rb} | {m:.0f} | {rm} |")
EOF
