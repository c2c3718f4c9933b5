#!/usr/bin/env python3
"""PyTorch CPU baseline for troupe's training benchmark (bench/train_bench.cpp).

Tooling only (torch + transformers); never a build, test or CI dependency.

    python3 bench/pytorch_train_bench.py --config cfg.json --seq-len 256 --micro-batch 4 \\
        --steps 5 --threads 2 [--impl eager,sdpa]
    python3 bench/pytorch_train_bench.py --hidden 256 --layers 4 --heads 8 --kv-heads 4 \\
        --intermediate 688 --vocab 258 --seq-len 128

It builds transformers' LlamaForCausalLM from the same config.json that train_bench reads (or from
the preset arguments), in float32 on the CPU, and times one training step per iteration:

    logits = model(ids).logits                                  # ids, targets: (B, T) random
    loss = F.cross_entropy(logits.view(-1, V), targets.view(-1)); loss.backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)     # torch.optim.AdamW, defaults

The first --warmup (2) steps are not timed. For each attention implementation (eager and sdpa),
it prints one JSON line:
    {"impl": ..., "threads": ..., "seq_len": ..., "micro_batch": ..., "step_ms": <median>,
     "step_ms_best": ..., "tokens_per_s": B*T / median step time, "params": ...}
The median (not the mean) is used because a shared machine gives occasional very slow steps.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()


def make_config(args):
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
        assert d.get("model_type", "llama") == "llama", "only Llama configs are supported"
        return LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       intermediate_size=args.intermediate, max_position_embeddings=max(4096, args.seq_len),
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def bench(cfg, impl, args):
    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg.to_dict())
    cfg._attn_implementation = impl
    model = LlamaForCausalLM(cfg).to(torch.float32).train()
    assert model.config._attn_implementation == impl
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    V, B, T = cfg.vocab_size, args.micro_batch, args.seq_len
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, V, (B, T), generator=g)
        targets = torch.randint(0, V, (B, T), generator=g)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
    median = statistics.median(times)
    return {"impl": impl, "threads": torch.get_num_threads(), "seq_len": T, "micro_batch": B,
            "step_ms": round(median * 1e3, 3), "step_ms_best": round(min(times) * 1e3, 3),
            "tokens_per_s": round(B * T / median, 1), "params": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="a Llama config.json (else the preset arguments below)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=258)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--impl", default="eager,sdpa", help="comma-separated attention implementations")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    for impl in args.impl.split(","):
        print(json.dumps(bench(cfg, impl, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
