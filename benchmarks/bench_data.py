"""filter + tokenize on Ray Data (the stages' own code) vs a plain single-process loop over the same images.

    .venv/bin/python benchmarks/bench_data.py [--images 2000] [--cpus 2] [--json out.json]

Makes a demo set (a fraction of it below the 64 px threshold), writes it as a download stage's
shards, then times (a) the filter and tokenize stages' `run()` on an embedded Ray (or RAY_ADDRESS)
with their Ray Data actor pools, and (b) one Python loop doing the same per image with the same
functions (`check_image`, `center_crop_arr`, the same visual tokenizer, same batch size). Both write
Parquet; their outputs are compared before the ratio is printed. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines import demo_shapes  # noqa: E402
from pipelines.download import SCHEMA as DOWNLOAD_SCHEMA  # noqa: E402
from pipelines.filter import FilterConfig, check_image  # noqa: E402
from pipelines.pretokenize import TokenizeConfig, center_crop_arr  # noqa: E402
from pipelines.resumable_parquet import to_arrow  # noqa: E402
from simplear.visual_tokenizers import load_visual_tokenizer, pil_to_tensor  # noqa: E402
from simplear.workflow.context import StageContext  # noqa: E402
from simplear.workflow.manifest import atomic_write_json, describe_outputs  # noqa: E402
from simplear.workflow.spec import Resources  # noqa: E402

FILTER = FilterConfig(min_short_edge=64, max_aspect_ratio=2.0, batch_size=200)
TOKENIZE = TokenizeConfig(tokenizer={"kind": "pixel-fsq", "levels": 10, "downsample": 8, "device": "cpu"},
                          resolutions=[{"size": 64}, {"size": 128}], batch_size=64)


def make_input(run_dir: Path, n: int, shard_rows: int = 250) -> list[str]:
    """A finished `download` stage of `n` demo images (PNG bytes), in shards of `shard_rows`."""
    rng = random.Random(0)
    colours = list(demo_shapes.PALETTE)
    stage = run_dir / "download"
    (stage / "shards").mkdir(parents=True)
    keys = []
    for s in range(0, n, shard_rows):
        rows: dict[str, list] = {f.name: [] for f in DOWNLOAD_SCHEMA}
        for i in range(s, min(n, s + shard_rows)):
            fg, bg = rng.sample(colours, 2)
            shape = rng.choice(demo_shapes.SHAPES)
            short = rng.choice([48, 64, 64, 96, 128, 160])
            w, h = (short, round(short * rng.choice([1, 1, 1.25, 1.5]))) if rng.random() < 0.5 else (round(short * 1.25), short)
            buf = io.BytesIO()
            demo_shapes.draw(fg, shape, bg, w, h, rng).save(buf, format="PNG")
            row = dict(key=f"b-{i:06d}", dataset="bench", url=f"http://x/{i}.png", caption=demo_shapes.caption_for(fg, shape, bg),
                       width=w, height=h, original_width=w, original_height=h, status="success", image=buf.getvalue())
            for k in rows:
                rows[k].append(row.get(k))
            keys.append(row["key"])
        pq.write_table(to_arrow(rows, DOWNLOAD_SCHEMA), stage / f"shards/{s // shard_rows:05d}.parquet")
    atomic_write_json(stage / "_MANIFEST.json", {"fingerprint": "bench", "outputs": describe_outputs(stage)})
    return keys


def context(run_dir: Path, name: str, kind: str, config, need: str, resources: Resources) -> StageContext:
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, kind=kind, config=config, resources=resources, stage_dir=run_dir / name, run_dir=run_dir,
                        needs=[need], fingerprint="bench", dataset_files={}, workflow_path=run_dir / "workflow.yaml", profile="bench")


def run_ray(run_dir: Path, cpus: int) -> float:
    from pipelines import filter as filter_stage
    from pipelines import pretokenize

    t0 = time.perf_counter()
    ctx = context(run_dir, "filter", "filter", FILTER, "download", Resources(cpus=1, concurrency=cpus))
    filter_stage.run(ctx)
    atomic_write_json(ctx.stage_dir / "_MANIFEST.json", {"fingerprint": "bench", "outputs": describe_outputs(ctx.stage_dir)})
    actor_cpus = max(0.5, (cpus - 0.5) / cpus)  # leave room for the read and write tasks beside the actor pool
    pretokenize.run(context(run_dir, "tokenize", "tokenize", TOKENIZE, "filter", Resources(cpus=actor_cpus, concurrency=cpus)))
    return time.perf_counter() - t0


def run_loop(run_dir: Path) -> float:
    """The same work in one process: decode + check, crop, encode in batches, write one Parquet per resolution."""
    from PIL import Image

    t0 = time.perf_counter()
    tok = load_visual_tokenizer(TOKENIZE.tokenizer)
    files = sorted((run_dir / "download/shards").glob("*.parquet"))
    kept: list[tuple[str, Image.Image, str]] = []
    for f in files:
        t = pq.read_table(f, columns=["key", "caption", "image"]).to_pydict()
        for key, caption, data in zip(t["key"], t["caption"], t["image"]):
            reason, *_ = check_image(data, FILTER.min_short_edge, FILTER.max_aspect_ratio, FILTER.verify_decode, FILTER.max_pixels)
            if reason is None:
                with Image.open(io.BytesIO(data)) as im:
                    kept.append((key, im.convert("RGB"), caption))
    out = run_dir / "loop"
    out.mkdir()
    for res in TOKENIZE.resolutions:
        sel = [(k, im, c) for k, im, c in kept if min(im.size) >= res.size]
        codes = []
        for i in range(0, len(sel), TOKENIZE.batch_size):
            x = np.stack([pil_to_tensor(center_crop_arr(im, res.size)).numpy() for _, im, _ in sel[i : i + TOKENIZE.batch_size]])
            import torch

            codes += [c.reshape(-1).numpy().astype(np.int32) for c in tok.encode(torch.from_numpy(x))]
        table = pa.table({"key": [k for k, _, _ in sel], "caption": [c for _, _, c in sel],
                          "codes": pa.array(codes, type=pa.list_(pa.int32()))})
        pq.write_table(table, out / f"{res.size}.parquet")
    return time.perf_counter() - t0


def same_outputs(run_dir: Path) -> bool:
    for res in TOKENIZE.resolutions:
        ray_rows = pq.read_table(sorted((run_dir / "tokenize" / res.name).glob("*.parquet")), columns=["key", "codes"]).to_pydict()
        loop_rows = pq.read_table(run_dir / "loop" / f"{res.size}.parquet", columns=["key", "codes"]).to_pydict()
        a = dict(zip(ray_rows["key"], map(tuple, ray_rows["codes"])))
        b = dict(zip(loop_rows["key"], map(tuple, loop_rows["codes"])))
        if a != b:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("SIMPLEAR_DATA_STATS"):  # the stages then log Ray Data's per-operator stats
        import logging

        logging.basicConfig(level=logging.INFO)

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        run_dir = Path(tmp)
        keys = make_input(run_dir, args.images)
        t_ray = run_ray(run_dir, args.cpus)
        t_loop = run_loop(run_dir)
        ok = same_outputs(run_dir)
        kept = sum(pq.ParquetFile(f).metadata.num_rows for f in (run_dir / "filter/shards").glob("*.parquet"))
    ray.shutdown()
    result = {
        "images": len(keys), "kept": kept, "cpus": args.cpus,
        "ray_data_s": round(t_ray, 2), "plain_loop_s": round(t_loop, 2),
        "ray_data_images_per_s": round(len(keys) / t_ray, 1), "plain_loop_images_per_s": round(len(keys) / t_loop, 1),
        "ratio_loop_over_ray": round(t_loop / t_ray, 2), "same_outputs": ok,
    }
    print(json.dumps(result, indent=2))
    print(f"filter + tokenize, {len(keys)} images, {args.cpus} CPUs: Ray Data {t_ray:.1f}s, plain loop {t_loop:.1f}s, "
          f"ratio loop/Ray = {t_loop / t_ray:.2f}x ({'faster' if t_loop > t_ray else 'slower'} on Ray Data), outputs equal: {ok}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
