"""Speculative Jacobi decoding vs plain decoding in the torch engine, over models of different entropy.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_sjd.py [--tokens 256] [--batches 1 8] [--codebook 1000] \
        [--scales 0 4 12 30] [--json out.json]

Models: TINY_QWEN2 with random weights and its LM head scaled by each of --scales (0: uniform over the codes;
larger: sharper, lower entropy), and, with the demo's 1,000 codes, a tiny Qwen2 trained here at 128 px on the demo's
shapes by the project's own training loop (`simplear.train.train_loop` in this process on a `LocalSession`; the data
is tests/test_training_helpers.py's `shapes_table`), kept under --work-dir. Entropy is the mean of -log p of plain
decoding's codes under the distribution each was drawn from (CFG-combined): an unbiased estimate of the mean entropy
per token, in nats. For each model and batch size: plain decoding and SJD (window --window, drafts from the last
distribution, the default), the same prompts and seeds, one timed run each after a warm-up; steps are model
forwards (per image: its own; per batch: until its last image is done), time in wall and process CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from simplear.jacobi import JacobiSampler  # noqa: E402
from simplear.sampler import SamplingParams, TorchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128  # px of the trained model's images: 16 x 16 codes with pixel-fsq's downsample 8


def training_helpers():
    """tests/test_training_helpers.py: the tokenized demo shapes of the training tests."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_training_helpers

    return test_training_helpers


def train_shapes(out: Path, steps: int, images: int) -> Path:
    """The trained model: `steps` of next-token training on `images` tokenized 128 px shapes, in this process."""
    import pyarrow.parquet as pq

    from simplear.t2i import SequenceSpec, T2ITask
    from simplear.train import FINAL, LocalSession, TrainConfig, export_final, train_loop
    from simplear.visual_tokenizers import VisualTokenizerConfig

    helpers = training_helpers()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(helpers.shapes_table(images, SIZE, seed=0), out / "data.parquet")
    task = T2ITask(sequence=SequenceSpec(), caption="original", samples=None, grid=(SIZE // 8, SIZE // 8), seed=0,
                   model_init="tiny", visual_tokenizer=VisualTokenizerConfig(**helpers.VT))
    cfg = TrainConfig(steps=steps, global_batch_size=32, lr=1e-3, warmup_steps=min(20, steps), checkpoint_every=steps,
                      log_every=50)
    session = LocalSession([out / "data.parquet"], task.columns, out / "checkpoints")
    t0 = time.time()
    metrics = train_loop(task, cfg, session, out)
    print(f"  trained {steps} steps in {time.time() - t0:.0f} s: {metrics}", flush=True)
    export_final(session.checkpoints()[-1], out / FINAL)
    (out / "train_metrics.json").write_text(json.dumps(metrics))
    return out / FINAL


def random_model(vocab, scale: float):
    from simplear.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def compare(name: str, model, vocab, prompts: list[str], grid, batches: list[int], window: int, cfg: float) -> list[dict]:
    plain = TorchSampler(model, vocab)
    sjd = JacobiSampler(plain, window=window)
    N = grid[0] * grid[1]
    rows = []
    for B in batches:
        ps, params = (prompts * B)[:B], [SamplingParams(cfg_scale=cfg, seed=i) for i in range(B)]
        plain.generate_codes(ps, (2, 2), params)  # warm-up
        sjd.generate_codes(ps, (2, 2), params)
        (_, logps), wall_p, cpu_p = timed(lambda: plain.generate_codes(ps, grid, params, return_logprobs=True))
        (_, stats), wall_s, cpu_s = timed(lambda: sjd.generate_codes(ps, grid, params, return_stats=True))
        row = {"model": name, "batch": B, "tokens": N, "entropy_nats": -logps.mean().item(),
               "plain": {"steps": N, "wall_s": wall_p, "cpu_s": cpu_p},
               "sjd": {"steps_per_image": stats.mean_steps, "steps_batch": max(stats.steps), "wall_s": wall_s,
                       "cpu_s": cpu_s},
               "compression": stats.compression, "speedup_wall": wall_p / wall_s, "speedup_cpu": cpu_p / cpu_s,
               "load_avg_1min": os.getloadavg()[0]}
        rows.append(row)
        print(f"| {name} | {row['entropy_nats']:.2f} | {B} | {N} / {stats.mean_steps:.1f} ({max(stats.steps)}) "
              f"| {wall_p:.2f} ({cpu_p:.2f}) | {wall_s:.2f} ({cpu_s:.2f}) | {row['compression']:.1f}x "
              f"| {row['speedup_wall']:.2f}x ({row['speedup_cpu']:.2f}x) |", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=(SIZE // 8) ** 2, help="image tokens (a square number)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--codebook", type=int, default=1000, help="codes of the random models (the trained one has 1,000)")
    ap.add_argument("--scales", type=float, nargs="*", default=[0, 4, 12, 30], help="LM head scales of the random models")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--train-steps", type=int, default=400, help="0: no trained model")
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "results"), help="where the trained checkpoint is kept")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        ap.error("--tokens must be a square number")

    from simplear.model import load_checkpoint
    from simplear.vocab import Vocabulary

    prompts = sorted(set(training_helpers().shapes_table(64, SIZE, seed=1)["caption"].to_pylist()))[:8]
    results = {"torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "window": args.window, "cfg": args.cfg, "runs": []}
    print(f"{args.tokens} tokens, window {args.window}, CFG {args.cfg}, {torch.get_num_threads()} threads; "
          "steps: per image (per batch); seconds: wall (CPU)")
    print("| model | entropy (nats) | batch | steps plain / SJD | plain s | SJD s | step compression | SJD speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    vocab = Vocabulary("tiny", codebook_size=args.codebook)
    for scale in args.scales:
        results["runs"] += compare(f"random, {args.codebook} codes, head x{scale:g}", random_model(vocab, scale), vocab,
                                   prompts, (side, side), args.batches, args.window, args.cfg)
    if args.train_steps and args.tokens == (SIZE // 8) ** 2:
        from simplear.train import FINAL

        out = Path(args.work_dir) / f"sjd-shapes-{SIZE}px-{args.train_steps}"
        trained = (out / FINAL / "simplear.json").is_file()
        final = out / FINAL if trained else train_shapes(out, args.train_steps, args.train_images)
        ck = load_checkpoint(final)
        results["trained"] = {"checkpoint": str(final), "metrics": json.loads((out / "train_metrics.json").read_text())}
        results["runs"] += compare(f"trained {SIZE} px, {args.train_steps} steps", ck.model.eval(), ck.vocab, prompts,
                                   (side, side), args.batches, args.window, args.cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
