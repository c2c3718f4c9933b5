#!/usr/bin/env python3
"""Training checkpoints written by troupe load in HF transformers, exactly.

    tests/integration/checkpoint_hf_load.py --export-with build/tests/checkpoint_test
    tests/integration/checkpoint_hf_load.py ckpt/step-00000123 other_root ...

--export-with BIN runs `BIN --gtest_filter=CheckpointExport.*` with TROUPE_CHECKPOINT_EXPORT_DIR
set to a temporary directory (it writes one root per preset: tiny-llama, tiny-mixtral,
tiny-qwen2-moe, tiny-llama-tied) and checks each; otherwise every argument (a step dir, or a
root whose `latest` names one) is checked. For each checkpoint:
  1. AutoModelForCausalLM.from_pretrained loads it with no missing, unexpected or mismatched
     keys and no error messages;
  2. every tensor of model.safetensors equals the model's parameter bit for bit (f32; MoE
     experts through transformers 5's fused layout), and every model parameter comes from
     the file (lm_head only through tied embeddings);
  3. optimizer.safetensors (read by the safetensors library) holds exactly exp_avg.<name> and
     exp_avg_sq.<name> with the parameter's shape, and trainer_state.json's step matches;
  4. a forward pass gives finite logits of shape (1, T, vocab).
Exits 77 (ctest SKIP) when torch, transformers or safetensors cannot be imported (CI).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

SKIP = 77

try:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
except Exception as e:  # ImportError, or a broken install
    print(f"SKIP: needs torch + transformers + safetensors in python3 ({type(e).__name__}: {e})")
    sys.exit(SKIP)


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def resolve(path):
    """A step dir, or a root's `latest`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    latest = os.path.join(path, "latest")
    if not os.path.exists(latest):
        fail(f"{path}: neither a checkpoint dir (config.json) nor a root with `latest`")
    with open(latest) as f:
        return os.path.join(path, f.read().strip())


EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
KIND = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def in_model_layout(st, sd):
    """The file's tensors under the model's state_dict names. transformers 4 keeps HF's
    per-expert names; transformers 5 renames block_sparse_moe -> mlp and fuses the experts
    into mlp.experts.gate_up_proj (E, 2*I, C) = [gate; up] per expert and down_proj (E, C, I)."""
    out, experts = {}, {}
    for name, t in st.items():
        if name in sd:
            out[name] = t
            continue
        m = EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(KIND[m.group(3)], {})[int(m.group(2))] = t
            continue
        out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer, kinds in experts.items():
        n = len(kinds["gate"])
        gate = [kinds["gate"][e] for e in range(n)]
        up = [kinds["up"][e] for e in range(n)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g, u], 0) for g, u in zip(gate, up)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([kinds["down"][e] for e in range(n)])
    return out


def load_model(d):
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, **kw)


def check(d):
    model, info = load_model(d)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(key):
            fail(f"{d}: from_pretrained reports {key}: {sorted(info[key])[:8]}")
    model.eval()

    st = load_file(os.path.join(d, "model.safetensors"))
    sd = model.state_dict()
    want = in_model_layout(st, sd)
    for name, t in want.items():
        if name not in sd:
            fail(f"{d}/model.safetensors: tensor {name} is not a parameter of {type(model).__name__}")
        if t.dtype != torch.float32 or sd[name].dtype != torch.float32:
            fail(f"{d}: {name} is {t.dtype} in the file, {sd[name].dtype} in the model; expected float32")
        if sd[name].shape != t.shape or not torch.equal(sd[name], t):
            fail(f"{d}: {name} differs between the model {tuple(sd[name].shape)} and model.safetensors "
                 f"{tuple(t.shape)}")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in sd.items():
        if name in want:
            continue
        if name == "lm_head.weight" and tied:
            if t.data_ptr() != sd["model.embed_tokens.weight"].data_ptr():
                fail(f"{d}: tie_word_embeddings but lm_head.weight is not the embedding")
            continue
        fail(f"{d}: model parameter {name} is not in model.safetensors")

    opt_path = os.path.join(d, "optimizer.safetensors")
    with safe_open(opt_path, framework="pt") as f:
        keys = set(f.keys())
        want_keys = {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in st}
        if keys != want_keys:
            fail(f"{opt_path}: missing {sorted(want_keys - keys)[:4]}, unexpected {sorted(keys - want_keys)[:4]}")
        for k in sorted(keys):
            shape = list(f.get_slice(k).get_shape())
            name = k.split(".", 1)[1]
            if shape != list(st[name].shape):
                fail(f"{opt_path}: {k} has shape {shape}, the parameter {list(st[name].shape)}")
    with open(os.path.join(d, "trainer_state.json")) as f:
        state = json.load(f)
    base = os.path.basename(os.path.normpath(d))
    if base.startswith("step-") and state.get("step") != int(base[5:]):
        fail(f"{d}/trainer_state.json: step {state.get('step')} does not match {base}")

    tokens = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7]])
    with torch.no_grad():
        logits = model(tokens).logits
    if tuple(logits.shape) != (1, tokens.shape[1], model.config.vocab_size) or not torch.isfinite(logits).all():
        fail(f"{d}: forward gives logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
    n = sum(t.numel() for t in st.values())
    print(f"ok: {d}: {type(model).__name__}, {len(st)} tensors ({n} values) equal, "
          f"{len(keys)} optimizer tensors, step {state['step']}")


def main(argv):
    if len(argv) >= 2 and argv[0] == "--export-with":
        with tempfile.TemporaryDirectory(prefix="troupe_ckpt_hf_") as tmp:
            env = dict(os.environ, TROUPE_CHECKPOINT_EXPORT_DIR=tmp)
            r = subprocess.run([argv[1], "--gtest_filter=CheckpointExport.*"], env=env, timeout=120)
            if r.returncode != 0:
                fail(f"{argv[1]} exited {r.returncode}")
            roots = sorted(os.path.join(tmp, x) for x in os.listdir(tmp))
            if len(roots) < 4:
                fail(f"expected 4 exported checkpoints in {tmp}, found {roots}")
            for root in roots:
                check(resolve(root))
        return 0
    if not argv:
        print(__doc__)
        return 2
    for p in argv:
        check(resolve(p))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
