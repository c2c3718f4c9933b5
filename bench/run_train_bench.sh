#!/usr/bin/env bash
# bench/run_train_bench.sh — troupe's CPU training step against PyTorch's, on the same model
# and machine, in the same run. It prints a markdown table with the ratio troupe / PyTorch.
#
#   bench/run_train_bench.sh                                 # build/, 2 threads, T = 128 256 512
#   BUILD=build-bench THREADS=2 STEPS=5 ROUNDS=3 SEQS="128 256 512" RESULTS=out.jsonl bench/run_train_bench.sh
#
# The model is a small Llama: vocab 258, hidden 256, 4 layers, 8 heads / 4 kv heads, intermediate
# 688, untied, rope theta 10000, micro batch 4 (MICRO_BATCH). One config.json is written
# to a temporary folder and given to both programs:
#   * $BUILD/bench/train_bench (bench/train_bench.cpp): decoder::forward_backward + AdamW;
#   * bench/pytorch_train_bench.py: transformers' LlamaForCausalLM, eager and sdpa attention,
#     loss.backward() + torch.optim.AdamW.
# Both use THREADS threads (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS and each
# program's --threads). Each program reports the median and the fastest of STEPS steps after 2
# warm-up steps. This is repeated for ROUNDS rounds. The table uses the fastest step over all
# rounds, because on a shared machine the median mostly measures the other load. The median of
# the per-round medians is shown in parentheses.
# MFU uses the PaLM count 6N + 12*L*H*Q*T per token (see train_bench.cpp). The peak is
# the best of train_bench's sgemm 2048^3 runs (one per T) at the same thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
THREADS=${THREADS:-2}
STEPS=${STEPS:-5}
ROUNDS=${ROUNDS:-3}
SEQS=${SEQS:-"128 256 512"}
MICRO_BATCH=${MICRO_BATCH:-4}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TROUPE_NUM_THREADS=$THREADS

if [[ ! -x "$BUILD/bench/train_bench" ]]; then
  echo "run_train_bench.sh: $BUILD/bench/train_bench not found; build it with" \
       "cmake --build $BUILD --target train_bench (or set BUILD=<your build dir>)" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/config.json" <<'EOF'
{"model_type": "llama", "vocab_size": 258, "hidden_size": 256, "intermediate_size": 688,
 "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "tie_word_embeddings": false, "bos_token_id": null, "eos_token_id": null, "pad_token_id": null}
EOF

# ROUNDS rounds, each one sequence length at a time, troupe then PyTorch, so that a change in
# machine load hits both programs alike.
for round in $(seq "$ROUNDS"); do
  for T in $SEQS; do
    "$BUILD/bench/train_bench" --config "$tmp/config.json" --seq-len "$T" --micro-batch "$MICRO_BATCH" \
        --steps "$STEPS" --threads "$THREADS" >> "$tmp/results.jsonl" 2>> "$tmp/troupe.log"
    "$PYTHON" bench/pytorch_train_bench.py --config "$tmp/config.json" --seq-len "$T" \
        --micro-batch "$MICRO_BATCH" --steps "$STEPS" --threads "$THREADS" --impl eager,sdpa >> "$tmp/results.jsonl"
  done
  echo "round $round of $ROUNDS done" >&2
done
sed -n 2p "$tmp/troupe.log"
if [[ -n "${RESULTS:-}" ]]; then cp "$tmp/results.jsonl" "$RESULTS"; fi   # raw JSON lines, if asked for

"$PYTHON" - "$tmp/results.jsonl" <<'EOF'
import json, sys
import statistics
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in runs:  # merge the rounds: fastest step overall, median of the per-round medians
    by.setdefault((r["impl"], r["seq_len"]), []).append(r)
for key, rs in by.items():
    m = dict(rs[0], step_ms_best=min(x["step_ms_best"] for x in rs),
             step_ms=statistics.median(x["step_ms"] for x in rs),
             peak_gflops=max(x.get("peak_gflops", 0) for x in rs), rounds=len(rs))
    by[key] = m
rows = [by[k] for k in sorted(by, key=lambda k: (k[1], k[0]))]
tr = [r for r in rows if r["impl"] == "troupe"]
peak = max(r["peak_gflops"] for r in tr)  # each train_bench run measures it; a busy machine lowers it


def tps(r, key):  # tokens/s of the fastest ("step_ms_best") or the median ("step_ms") step
    return r["micro_batch"] * r["seq_len"] / (r[key] / 1e3)


def mfu(T, tokens_per_s):  # PaLM 6N + 12*L*H*Q*T per token, as train_bench computed it for this T
    return 100 * by[("troupe", T)]["model_tflop_per_token"] * 1e12 * tokens_per_s / (peak * 1e9)


print(f"\nsmall Llama: {tr[0]['params']} params, micro batch {tr[0]['micro_batch']}, "
      f"{tr[0]['threads']} threads, {tr[0]['rounds']} rounds; sgemm peak {peak:.1f} GFLOP/s (best over the runs)")
print("tokens/s of the fastest timed step over all rounds (median of the per-round medians in "
      "parentheses); MFU and ratios use the fastest step\n")
print("| T | troupe tok/s | troupe MFU | torch eager tok/s | torch sdpa tok/s | torch MFU (better impl) "
      "| troupe / eager | troupe / sdpa |")
print("|---|---|---|---|---|---|---|---|")
for r in tr:
    T = r["seq_len"]
    e, s = by[("eager", T)], by[("sdpa", T)]
    t, te, ts = tps(r, "step_ms_best"), tps(e, "step_ms_best"), tps(s, "step_ms_best")
    print(f"| {T} | {t:.0f} ({tps(r, 'step_ms'):.0f}) | {mfu(T, t):.1f}% | "
          f"{te:.0f} ({tps(e, 'step_ms'):.0f}) | {ts:.0f} ({tps(s, 'step_ms'):.0f}) | "
          f"{mfu(T, max(te, ts)):.1f}% | {t / te:.2f} | {t / ts:.2f} |")
EOF
