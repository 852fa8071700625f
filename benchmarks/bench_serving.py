"""Serving engines on a trained checkpoint; ratios come from one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_serving.py [--model CKPT] [--json out.json]

vLLM (CFG in a logits processor) vs the torch engine (KV cache, batched CFG): images/s at batch 1
and 16, seeded sampling with CFG, codes + decode to images. (Speculative Jacobi decoding against
plain decoding: benchmarks/bench_sjd.py.)

The checkpoint: --model, else the demo's GRPO checkpoint (runs/demo/grpo/final) if it exists, else a
tiny Qwen2 trained here for --train-steps on the demo's shapes (64 px, pixel-fsq L=10: 1,000 codes,
64 tokens), cached under --work-dir. Torch runs first: vLLM on CPU pins threads when it starts.
Timed runs are interleaved and the best kept (other load on the machine hits all alike); wall and
process CPU time are both reported (vLLM runs in this process), with the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM reduces torch to 1 thread unless OMP_NUM_THREADS is set: both engines get the same threads
os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 8)))

import torch  # noqa: E402

from simplear.sampler import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle on a black background",
           "a purple diamond on an orange background", "a white cross on a pink background", "a cyan circle on a red background",
           "a black square on a yellow background", "an orange triangle on a green background"]


def train_tiny(out: Path, steps: int, seed: int = 0) -> Path:
    """A tiny Qwen2 trained on the demo's shapes: a stand-in for the demo run's checkpoint."""
    from pipelines.demo_shapes import PALETTE, SHAPES, caption_for, draw
    from simplear.model import build_model, save_checkpoint
    from simplear.visual_tokenizers import load_visual_tokenizer, pil_to_tensor
    from simplear.vocab import Vocabulary

    vt = load_visual_tokenizer({"kind": "pixel-fsq", "levels": 10, "downsample": 8, "device": "cpu"})
    vocab = Vocabulary("tiny", codebook_size=vt.codebook_size)
    rng = random.Random(seed)
    colours = list(PALETTE)
    captions, images = [], []
    for _ in range(2000):
        fg, bg = rng.sample(colours, 2)
        shape = rng.choice(SHAPES)
        captions.append(caption_for(fg, shape, bg))
        images.append(pil_to_tensor(draw(fg, shape, bg, 64, 64, rng)))
    codes = torch.cat([vt.encode(torch.stack(images[i:i + 250])) for i in range(0, len(images), 250)])
    torch.manual_seed(seed)
    model = build_model("tiny", vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, loss = time.time(), float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        idx = torch.randint(0, len(captions), (32,), generator=gen).tolist()
        batch = vocab.build_batch([captions[i] for i in idx], [codes[i] for i in idx], cfg_dropout=0.1,
                                  image_loss_only=True, generator=gen)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step}: image-token loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    save_checkpoint(out, model.eval(), vocab, vt.config, extra={"trained_by": "benchmarks/bench_serving.py", "steps": steps,
                                                                   "final_loss": loss.item()})
    return out


def timed(fn, repeats: int, samplers: dict):
    """Best wall and CPU seconds of each sampler over `repeats` interleaved runs; the last outputs."""
    wall = {k: math.inf for k in samplers}
    cpu = {k: math.inf for k in samplers}
    out = {}
    for _ in range(repeats):
        for k, s in samplers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out[k] = fn(k, s)
            wall[k] = min(wall[k], time.perf_counter() - w0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: runs/demo/grpo/final, else a tiny one trained here)")
    ap.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "results"), help="where the tiny trained checkpoint is kept")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    from simplear.model import load_checkpoint
    from simplear.sampler import TorchSampler

    demo = ROOT / "runs" / "demo" / "grpo" / "final"
    if args.model:
        ckpt_dir = Path(args.model)
    elif demo.is_dir():
        ckpt_dir = demo
    else:
        ckpt_dir = Path(args.work_dir) / f"tiny-shapes-{args.train_steps}"
        if not (ckpt_dir / "simplear.json").is_file():
            print(f"no --model and no demo run: training a tiny checkpoint ({args.train_steps} steps) -> {ckpt_dir}", flush=True)
            train_tiny(ckpt_dir, args.train_steps)
    ckpt = load_checkpoint(ckpt_dir)
    vt = ckpt.load_visual_tokenizer()
    grid = (args.size // vt.downsample, args.size // vt.downsample)
    N = grid[0] * grid[1]
    torch_sampler = TorchSampler(ckpt.model.eval(), ckpt.vocab, vt)
    results = {"checkpoint": str(ckpt_dir), "checkpoint_extra": ckpt.extra, "size": args.size, "tokens": N,
               "codebook": ckpt.vocab.codebook_size, "cfg": args.cfg, "torch_threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(f"checkpoint {ckpt_dir}: {sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f}M params, "
          f"{ckpt.vocab.codebook_size} codes, {args.size} px = {N} tokens, CFG {args.cfg}, {torch.get_num_threads()} threads", flush=True)

    def params(n, seed0=0, **kw):
        return [SamplingParams(cfg_scale=args.cfg, seed=seed0 + i, **kw) for i in range(n)]

    # -- engines: torch vs vLLM -------------------------------------------------------------------
    engines = {"torch": torch_sampler}
    if not args.skip_vllm:
        from simplear.vllm_engine import VLLMOptions, VLLMSampler

        t0 = time.time()
        engines["vllm"] = VLLMSampler(ckpt_dir, vt, VLLMOptions(max_num_seqs=max(32, 2 * max(args.batches))),
                                      max_text_tokens=64, max_image_tokens=N)
        results["vllm_start_s"] = time.time() - t0
    results["engines"] = []
    print(f"\nengines, seeded sampling with CFG {args.cfg}, {args.size} px, codes + decode (best of {args.repeats})")
    print("| batch | torch images/s (CPU s) | vLLM images/s (CPU s) | vLLM / torch |")
    print("|---:|---:|---:|---:|")
    for b in args.batches:
        ps = (PROMPTS * b)[:b]
        for e in engines.values():
            e.generate_images(ps[:1], size=args.size, params=params(1))  # warm-up
        load = os.getloadavg()[0]
        wall, cpu, imgs = timed(lambda k, e: e.generate_images(ps, size=args.size, params=params(b)), args.repeats, engines)
        row = {"batch": b, "load_avg_1min": load, **{f"{k}_images_per_s": b / wall[k] for k in engines},
               **{f"{k}_cpu_s": cpu[k] for k in engines}}
        if "vllm" in engines:
            row["vllm_over_torch"] = wall["torch"] / wall["vllm"]
        results["engines"].append(row)
        v = f"{row['vllm_images_per_s']:.2f} ({cpu['vllm']:.2f}) | {row['vllm_over_torch']:.2f}x" if "vllm" in engines else "- | -"
        print(f"| {b} | {row['torch_images_per_s']:.2f} ({cpu['torch']:.2f}) | {v} |", flush=True)
    if "vllm" in engines:
        g = [SamplingParams(cfg_scale=args.cfg, temperature=0)] * 4
        results["greedy_codes_equal_vllm_torch"] = torch.equal(engines["vllm"].generate_codes(PROMPTS[:4], grid, g),
                                                               torch_sampler.generate_codes(PROMPTS[:4], grid, g))
        print(f"greedy codes, vLLM == torch: {results['greedy_codes_equal_vllm_torch']}; vLLM start {results['vllm_start_s']:.0f} s")
    print(f"load average (1 min) now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    main()
