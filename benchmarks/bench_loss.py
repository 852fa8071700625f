"""Peak memory and time of loss + backward at the production shapes: full logits vs `simplear.losses`.

    .venv/bin/python benchmarks/bench_loss.py [--layers 2] [--chunk 1024] [--json out.json]

A Qwen2.5-0.5B-shaped model (hidden 896, 14 heads, 2 KV heads, intermediate 4,864, tied embeddings)
with the joint vocabulary (151,665 text + 7 specials + 64,000 visual = 215,672 rows) and its body cut
to `--layers` decoder layers, fp32 weights under bf16 autocast (the production precision), on CPU.
Sequences of 256 text + 1,024 or 4,096 image tokens + 2 specials = 1,282 and 4,354 tokens. Each case
runs in a fresh process: the model is built and one small step allocates its gradients, then one
forward + backward at the case's shape; the figure is the rise of the process's peak resident memory
over that baseline (so weights and gradients are left out, activations and logits are in).

Cases: the chunked loss at the production micro-batches (pretrain 8 x 1,282, SFT 2 x 4,354), and both
paths at micro-batch 1 (the full-logits path at production micro-batches does not fit this machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 151_665 + 7 + 64_000
GIB = 2**30


def model(layers: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                                        num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=VOCAB,
                                        tie_word_embeddings=True, max_position_embeddings=8192))


def batch(b: int, length: int):
    import torch

    g = torch.Generator().manual_seed(b * 10_000 + length)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(length).expand(b, length),
            "labels": ids.clone()}


def full_logits_loss(m, x):
    """What T2ITask.loss did before simplear.losses: every position's logits, then an fp32 copy."""
    import torch.nn.functional as F

    out = m(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"], use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x["labels"][:, 1:].reshape(-1), reduction="none")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def case(args) -> dict:
    path, b, length, layers, chunk = args
    import torch

    from simplear.losses import causal_lm_cross_entropy

    torch.set_num_threads(2)
    m = model(layers)

    def step(x) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce = full_logits_loss(m, x) if path == "full_logits" else causal_lm_cross_entropy(m, x, chunk)
        ce.mean().backward()

    step(batch(1, 16))  # gradients allocated: part of the baseline
    base = peak_rss()
    t0 = time.perf_counter()
    step(batch(b, length))
    seconds = time.perf_counter() - t0
    return {"path": path, "micro_batch": b, "tokens": length, "extra_peak_gib": round((peak_rss() - base) / GIB, 2),
            "baseline_gib": round(base / GIB, 2), "seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    cases = [("chunked", 8, 1282), ("chunked", 2, 4354), ("full_logits", 1, 1282), ("chunked", 1, 1282),
             ("full_logits", 1, 4354), ("chunked", 1, 4354)]
    results = []
    ctx = multiprocessing.get_context("spawn")
    for path, b, length in cases:
        with ctx.Pool(1) as pool:  # a fresh process per case: peaks do not carry over
            r = pool.apply(case, ((path, b, length, args.layers, args.chunk),))
        print(f"{r['path']:>11} {b} x {length:>5}: +{r['extra_peak_gib']:6.2f} GiB over {r['baseline_gib']} GiB, "
              f"{r['seconds']} s", flush=True)
        results.append(r)

    def get(path, b, length):
        return next(r for r in results if (r["path"], r["micro_batch"], r["tokens"]) == (path, b, length))

    summary = {
        "peak_memory_ratio": round(get("full_logits", 1, 4354)["extra_peak_gib"] / get("chunked", 1, 4354)["extra_peak_gib"], 2),
        "peak_memory_ratio_1282": round(get("full_logits", 1, 1282)["extra_peak_gib"] / get("chunked", 1, 1282)["extra_peak_gib"], 2),
        "time_ratio_4354": round(get("chunked", 1, 4354)["seconds"] / get("full_logits", 1, 4354)["seconds"], 2),
        "vocab": VOCAB, "hidden": 896, "layers": args.layers, "chunk": args.chunk, "cases": results,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
