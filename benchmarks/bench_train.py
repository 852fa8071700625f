"""Tokens/s of the Ray Train loop against a plain torch loop: same tiny model, same data, same batch.

    .venv/bin/python benchmarks/bench_train.py [--steps 200] [--batch 32] [--threads 2] [--address HOST:PORT]

Three runs: (1) a plain torch loop (what nanoGPT would write: no Ray, no hooks); (2) the project's
`train_loop` in one process (`LocalSession`: the hooks, metrics, checkpoints, no Ray); (3) the same
loop on Ray Train (`fit`: TorchTrainer, each worker reading its files, reports, checkpoints). For each: the median
tokens/s of single steps (what the loop costs per step) and tokens over the whole wall time
(with Ray: starting the controller and workers, streaming the data, reporting checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from simplear.t2i import SequenceSpec, T2ITask  # noqa: E402
from simplear.train import LocalSession, TrainConfig, fit, read_metrics, train_loop  # noqa: E402
from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer, pil_to_tensor  # noqa: E402

from meter import Meter  # noqa: E402  (benchmarks/meter.py)

VT = VisualTokenizerConfig(kind="pixel-fsq", levels=10)


def make_data(path: Path, count: int, size: int, seed: int = 0) -> None:
    from pipelines.demo_shapes import PALETTE, SHAPES, caption_for, draw

    rng = random.Random(seed)
    tok = load_visual_tokenizer(VT)
    captions, images = [], []
    for _ in range(count):
        fg, bg = rng.sample(list(PALETTE), 2)
        shape = rng.choice(SHAPES)
        captions.append(caption_for(fg, shape, bg))
        images.append(pil_to_tensor(draw(fg, shape, bg, size, size, rng)))
    codes = tok.encode(torch.stack(images)).reshape(count, -1).to(torch.int32).numpy()
    pq.write_table(pa.table({"caption": captions, "height": [size] * count, "width": [size] * count,
                             "codes": pa.array(list(codes), type=pa.list_(pa.int32()))}), path)


def plain_torch(data: Path, cfg: TrainConfig, threads: int) -> dict:
    """The baseline: build, then for each step a batch from memory, forward, backward, clip, AdamW."""
    import numpy as np

    from simplear.model import build_model
    from simplear.vocab import Vocabulary

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    table = pq.read_table(data, columns=["caption", "codes"])
    captions, codes = table["caption"].to_pylist(), [np.asarray(c) for c in table["codes"].to_pylist()]
    vocab = Vocabulary("tiny", codebook_size=VT.codebook_size)
    model = build_model("tiny", vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    rng = np.random.default_rng(cfg.seed)
    order, at, times, tokens = rng.permutation(len(captions)), 0, [], 0
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        if at + cfg.global_batch_size > len(order):
            order, at = rng.permutation(len(captions)), 0
        idx = order[at: at + cfg.global_batch_size]
        at += cfg.global_batch_size
        batch = vocab.build_batch([captions[i] for i in idx], [codes[i] for i in idx], cfg_dropout=0.1, generator=torch.Generator().manual_seed(at))
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = int(batch["attention_mask"].sum())
        tokens += n
        times.append(n / (time.perf_counter() - t0))
    return {"step_tokens_per_s": statistics.median(times), "wall_tokens_per_s": tokens / (time.perf_counter() - t_start),
            "tokens": tokens}


def task(grid) -> T2ITask:
    return T2ITask(sequence=SequenceSpec(), caption="original", samples=None, grid=grid, seed=0, visual_tokenizer=VT)


def from_metrics(out: Path, wall: float) -> dict:
    rows = read_metrics(out)
    tokens = sum(r["tokens"] for r in rows)
    return {"step_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]), "wall_tokens_per_s": tokens / wall,
            "tokens": tokens}


def local_loop(data: Path, cfg: TrainConfig, out: Path, grid) -> dict:
    t = task(grid)
    with Meter() as meter:
        t0 = time.perf_counter()
        train_loop(t, cfg, LocalSession([data], t.columns, out / "checkpoints"), out)
        wall = time.perf_counter() - t0
    return {**from_metrics(out, wall), **meter.figures()}


def ray_train(data: Path, cfg: TrainConfig, out: Path, grid, address: str | None) -> dict:
    import ray
    from simplear.train_data import DataFile
    from simplear.workflow.spec import Resources

    ray.init(address=address, num_cpus=None if address else 2, include_dashboard=False, log_to_driver=False)
    try:
        # RAY_ADDRESS for Ray Train's actors: on a host with several Ray clusters its PlacementGroupCleaner
        # may otherwise look at another one and remove this run's placement group
        env = {"OMP_WAIT_POLICY": "PASSIVE", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

        @ray.remote(num_cpus=0, runtime_env={"env_vars": env})
        def run_fit() -> float:
            t = task(grid)
            t0 = time.perf_counter()
            fit(t, cfg, stage_dir=out, resources=Resources(cpus=1), files=[DataFile(str(data), pq.ParquetFile(data).metadata.num_rows)],
                columns=t.columns)
            return time.perf_counter() - t0

        with Meter() as meter:  # Ray started and idle before: what the run adds to it
            wall = ray.get(run_fit.remote())
        return {**from_metrics(out, wall), **meter.figures()}
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (codes: (size/8)^2)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one with 2 CPUs)")
    args = p.parse_args(argv)

    cfg = TrainConfig(steps=args.steps, global_batch_size=args.batch, lr=1e-3, warmup_steps=0, checkpoint_every=100,
                      num_threads=args.threads, log_every=1)
    grid = (args.size // 8, args.size // 8)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data.parquet"
        make_data(data, args.rows, args.size)
        with Meter() as meter:
            plain = plain_torch(data, cfg, args.threads)
        results = {
            "plain torch loop": {**plain, **meter.figures()},
            "train_loop, no Ray": local_loop(data, cfg, tmp / "local", grid),
            "train_loop on Ray Train": ray_train(data, cfg, tmp / "ray", grid, args.address),
        }
    base = results["plain torch loop"]
    print(f"\n{args.steps} steps x {args.batch} sequences of {grid[0] * grid[1]} image tokens, {args.threads} threads, "
          f"checkpoint every {cfg.checkpoint_every} steps")
    print(f"{'':26}{'step tokens/s':>15}{'ratio':>8}{'wall tokens/s':>16}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:26}{r['step_tokens_per_s']:>15.0f}{r['step_tokens_per_s'] / base['step_tokens_per_s']:>8.2f}"
              f"{r['wall_tokens_per_s']:>16.0f}{r['wall_tokens_per_s'] / base['wall_tokens_per_s']:>8.2f}")
    ray_r = results["train_loop on Ray Train"]
    print(f"\nratio Ray Train / plain torch: {ray_r['step_tokens_per_s'] / base['step_tokens_per_s']:.2f} per step, "
          f"{ray_r['wall_tokens_per_s'] / base['wall_tokens_per_s']:.2f} over the whole run")
    print(f"\n{'CPU-ms per 1k tokens':26}" + "".join(f"{1000 * r['cpu_s'] / r['tokens'] * 1000:>10.1f}" for r in results.values()))
    for name, r in results.items():
        print(f"  {name}: " + ", ".join(f"{op} {s:.1f} s" for op, s in r["cpu_by_process"].items()))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
