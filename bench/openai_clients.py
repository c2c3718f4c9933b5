#!/usr/bin/env python3
"""troupe serve driven by real OpenAI clients (tooling only: torch, transformers, openai, lm_eval).

  python bench/openai_clients.py make-model DIR      # a small Llama trained here on tinyshakespeare, HF format,
                                                     # with the ChatML BPE tokenizer of tests/fixtures/tokenizers/qwen2
  python bench/openai_clients.py make-task DIR N     # a LAMBADA-style loglikelihood task (N docs) for lm_eval
  python bench/openai_clients.py check-openai URL MODEL_DIR      # the official openai client, checked against transformers
  python bench/openai_clients.py compare-lm-eval OUT_DIR MODEL_DIR URL   # lm_eval's loglikelihoods vs transformers

bench/run_openai_clients.sh runs them in order around a `troupe serve`. Every number compared here is
recomputed with transformers (float32, eager attention) on the same token ids.
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "text", "tinyshakespeare.txt")
if not os.path.exists(TEXT):
    TEXT = os.path.join(ROOT, "examples", "data", "tinyshakespeare.txt")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "qwen2")
MODEL_NAME = "tiny-shakespeare"


def make_model(out):
    import shutil
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    text = open(TEXT).read()
    ids = torch.tensor(tok(text[: len(text) * 9 // 10])["input_ids"], dtype=torch.long)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    T, B, steps = 128, 16, 800
    for step in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,))
        x = torch.stack([ids[s:s + T] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(out, f))
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, vocab {len(tok)}")


def make_task(out, n):
    """Lines of the held-out 10% whose last word is predicted from the text before it."""
    text = open(TEXT).read()
    held = text[len(text) * 9 // 10:]
    lines = [l for l in held.split("\n") if len(l.split()) >= 6]
    docs = []
    for i in range(0, len(lines) - 3, 3):
        ctx_lines = lines[i:i + 3]
        words = ctx_lines[-1].rstrip(".,;:!?'").split()
        if len(words) < 6 or not words[-1].isalpha():
            continue
        last = words[-1]
        head = "\n".join(ctx_lines[:-1] + [ctx_lines[-1][: ctx_lines[-1].rfind(last)].rstrip()])
        docs.append({"context": head, "target": last})
        if len(docs) == n:
            break
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "shakespeare_lastword.jsonl")
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with open(os.path.join(out, "shakespeare_lastword.yaml"), "w") as f:
        f.write(f"""task: shakespeare_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    print(f"{data}: {len(docs)} documents")


def reference(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()

    def logprobs(ids):  # (T, V) log-softmax rows: row t = the distribution of token t + 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, dim=-1)

    return logprobs


def check_openai(url, model_dir):
    import openai
    import torch
    from transformers import AutoTokenizer

    lp_ref = reference(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-troupe")
    worst = 0.0
    results = []

    # completions: echo + logprobs of prompt and generated tokens against transformers
    prompt = tok("ROMEO:\nBut soft, what light through yonder window", add_special_tokens=False)["input_ids"]
    r = client.completions.create(model=MODEL_NAME, prompt=[prompt], max_tokens=12, temperature=0, logprobs=5,
                                  echo=True)
    ch = r.choices[0]
    n_gen = len(ch.logprobs.tokens) - len(prompt)
    assert n_gen == 12, n_gen
    gen_ids = tok(ch.text[len(tok.decode(prompt)):], add_special_tokens=False)["input_ids"]
    ref = lp_ref(prompt + gen_ids)
    all_ids = prompt + gen_ids
    assert ch.logprobs.token_logprobs[0] is None
    for t in range(1, len(prompt) + min(n_gen, len(gen_ids))):
        want = ref[t - 1][all_ids[t]].item()
        got = ch.logprobs.token_logprobs[t]
        worst = max(worst, abs(want - got))
    # top_logprobs of the first generated token: the 5 most likely of transformers, same values
    t0 = len(prompt)
    top_ref = torch.topk(ref[t0 - 1], 5)
    top_got = ch.logprobs.top_logprobs[t0]
    for v, i in zip(top_ref.values.tolist(), top_ref.indices.tolist()):
        name = tok.decode([i])
        if name in top_got:
            worst = max(worst, abs(top_got[name] - v))
    results.append(f"completions echo+logprobs=5: {len(prompt)} prompt + {n_gen} generated tokens, "
                   f"max |logprob - transformers| = {worst:.2e}")
    assert worst < 1e-4, worst

    # greedy text = transformers' greedy continuation
    with torch.no_grad():
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
        g = m.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_text = tok.decode(g[0][len(prompt):])
    got = client.completions.create(model=MODEL_NAME, prompt=[prompt], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    assert got == want_text, (got, want_text)
    results.append(f"greedy completion = transformers generate: {got!r}")

    # n, best_of, seeds
    r = client.completions.create(model=MODEL_NAME, prompt="JULIET:", max_tokens=16, n=3, temperature=1.0, seed=7)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) > 1
    r2 = client.completions.create(model=MODEL_NAME, prompt="JULIET:", max_tokens=16, n=3, temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    b = client.completions.create(model=MODEL_NAME, prompt="JULIET:", max_tokens=8, best_of=4, n=2, seed=3)
    assert len(b.choices) == 2
    results.append("n=3 (seeded: repeatable, choices differ), best_of=4 n=2: 2 choices")

    # penalties and logit_bias change what comes out: the most repeated token repeats less
    def top_count(extra=None, **kw):
        r = client.completions.create(model=MODEL_NAME, prompt="To be, or not to be", max_tokens=48, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True, **(extra or {})}, **kw)
        toks = r.choices[0].logprobs.tokens
        return max(toks.count(t) for t in toks), r.choices[0].text
    plain_n, plain = top_count()
    pen_n, pen = top_count(frequency_penalty=2.0, presence_penalty=1.0)
    rep_n, rep = top_count(extra={"repetition_penalty": 1.8})
    assert pen_n < plain_n and rep_n < plain_n, (plain_n, pen_n, rep_n)
    space_the = tok(" the", add_special_tokens=False)["input_ids"][0]
    biased = client.completions.create(model=MODEL_NAME, prompt="To be, or not to be", max_tokens=4, temperature=0,
                                       logit_bias={str(space_the): 100})
    assert biased.choices[0].text == " the" * 4, biased.choices[0].text
    results.append(f"penalties: the most repeated of 48 greedy tokens {plain_n}x -> {pen_n}x (frequency 2, presence 1), "
                   f"{rep_n}x (repetition 1.8); logit_bias -> {biased.choices[0].text!r}")

    # chat with logprobs / top_logprobs, streamed with usage
    c = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Who is there?"}],
                                       max_tokens=10, logprobs=True, top_logprobs=3, temperature=0)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(x.top_logprobs) == 3 for x in content)
    assert all(abs(x.logprob - x.top_logprobs[0].logprob) < 1e-6 for x in content)  # greedy: the top one
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    results.append(f"chat logprobs/top_logprobs=3: {len(content)} tokens; stream with usage: {len(chunks)} chunks")

    # response_format json_schema
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                              "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    j = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "A person as JSON"}],
                                       max_tokens=200, seed=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": schema}})
    doc = json.loads(j.choices[0].message.content)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int), doc
    assert j.choices[0].finish_reason == "stop"
    results.append(f"response_format json_schema: {j.choices[0].message.content!r}")

    # errors the client raises as typed exceptions
    try:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found"
    try:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1, extra_body={"mirostat": 2})
        raise AssertionError("an unknown parameter was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "mirostat"
    try:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        raise AssertionError("tools were accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools"
    results.append("unknown model -> NotFoundError(model_not_found); unknown parameter, tools -> BadRequestError "
                   "naming them")
    for line in results:
        print("ok:", line)


def compare_lm_eval(out_dir, model_dir, url):
    import glob
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    files = glob.glob(os.path.join(out_dir, "**", "samples_shakespeare_lastword_*.jsonl"), recursive=True)
    assert files, f"no lm_eval samples under {out_dir}"
    lp_ref = reference(model_dir)
    # lm_eval's own request encoding (context and continuation token ids) for the same documents
    lm = LocalCompletionsAPI(model=MODEL_NAME, base_url=url + "/v1/completions", tokenizer=model_dir,
                             tokenizer_backend="huggingface", tokenized_requests=True)
    worst, n, greedy_same = 0.0, 0, 0
    total_ll = 0.0
    for line in open(sorted(files)[-1]):
        s = json.loads(line)
        ctx, cont = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        got_ll, got_greedy = float(s["resps"][0][0][0]), str(s["resps"][0][0][1]) == "True"
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        ids = ctx_ids + cont_ids
        ref = lp_ref(ids)
        want = sum(ref[len(ctx_ids) + k - 1][t].item() for k, t in enumerate(cont_ids))
        want_greedy = all(ref[len(ctx_ids) + k - 1].argmax().item() == t for k, t in enumerate(cont_ids))
        worst = max(worst, abs(want - got_ll))
        greedy_same += int(want_greedy == got_greedy)
        total_ll += want
        n += 1
    print(f"lm_eval local-completions: {n} documents; max |loglikelihood - transformers| = {worst:.2e}; "
          f"is_greedy equal on {greedy_same}/{n}; mean loglikelihood {total_ll / n:.4f}")
    assert n > 0 and worst < 1e-3 and greedy_same == n


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make-model":
        make_model(sys.argv[2])
    elif cmd == "make-task":
        make_task(sys.argv[2], int(sys.argv[3]))
    elif cmd == "check-openai":
        check_openai(sys.argv[2], sys.argv[3])
    elif cmd == "compare-lm-eval":
        compare_lm_eval(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__)
        sys.exit(2)
