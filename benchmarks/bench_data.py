"""filter + tokenize on Ray Data vs one process vs multiprocessing.Pool(2): the stages' own functions in all three.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_data.py [--images 10000] [--size 512] [--warmup 1000]
        [--repeat 2] [--settle-below 0.8] [--settle-limit 240] [--contended-above 1.0]
        [--engines ray_data,single_loop,pool_2] [--data DIR] [--json out.json]

Input: a finished download stage of `--images` photo-like JPEGs (smooth colour fields with grain, so they
compress and decode like photos, not like flat test cards), short edge `--size` (one in ten half that,
which the filter rejects), long edge up to 1.5x, in shards of 1,000 rows; `--data` keeps it between runs.

The work is the same in all three: the filter's `read_process_write` per download shard (decode, check,
write the kept rows with a reference to their pixels), then per filter part the tokenize reader's
`read_sources` + `prepare_crops` (fetch the bytes, decode, centre-crop) and the `Encoder` (pixel-fsq,
downsample 8, to Parquet in parts of `rows_per_part`). Ray Data runs them as the stages do (`run()`: the filter
and tokenize on CPUs alone: 2 `SourceWorker` actors each, doing whole sources) on a cluster started once
and warmed; the loop calls them one after another; the pool maps them over sources in 2 processes.

A round runs an engine twice, on a warm-up set (`--warmup` images) and on the full set: the steady-state rate is
the difference of images over the difference of seconds, so the fixed costs of a run (worker and actor
start-up, imports, the tokenizer's load) cancel; start-up is reported apart. Each engine runs `--repeat` rounds
and the median is reported. CPU-seconds per image come from sampling the CPU times of this process and all its
descendants (Ray's raylet and workers, the pool's processes) every 0.2 s, also by operator (what each process
was doing when sampled: a Ray worker's title names its task or actor). Before each run the script waits (up to
`--settle-limit` s) for the 1-minute load average to fall below `--settle-below` (what the previous run left
decays with a 1-minute time constant), and records the load before and during the run; when a run still started
above `--contended-above` (one core busy), another workload was running and no ratio is printed.
Ray Data's own `stats()` of the last full run are kept in the JSON. The filter's kept keys and the codes of all
three are compared before any figure is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines import filter as filter_stage  # noqa: E402
from pipelines import pretokenize  # noqa: E402
from pipelines.download.schema import IMAGE_ROW_GROUP, SCHEMA as DOWNLOAD_SCHEMA  # noqa: E402
from pipelines.pixels import record_pixel_files  # noqa: E402
from pipelines.resumable_parquet import (RUN, SRC, SRC_FILE, SourceWorker, SplitByReason, input_sources,  # noqa: E402
                                         read_process_write, to_arrow)
from simplear.workflow.context import StageContext  # noqa: E402
from simplear.storage.local import LocalStore  # noqa: E402
from simplear.workflow.manifest import atomic_write_json, describe_outputs  # noqa: E402
from simplear.workflow.spec import Resources  # noqa: E402

from meter import Meter, settle  # noqa: E402  (benchmarks/meter.py)

SHARD_ROWS = 1000
ENGINES = ("ray_data", "single_loop", "pool_2")


def configs(size: int):
    f = filter_stage.FilterConfig(min_short_edge=size * 3 // 4, max_aspect_ratio=2.0, batch_size=256)
    t = pretokenize.TokenizeConfig(tokenizer={"kind": "pixel-fsq", "levels": 10, "downsample": 8, "device": "cpu"},
                                   resolutions=[{"size": size}], batch_size=32, rows_per_part=256,
                                   prepare={"cpus": 0.25, "tasks": 4})
    return f, t


# ---- input ---------------------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG with what photos have: smooth colour regions and fine grain (so ~0.3 bytes per pixel, not 0.02)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shard(args) -> None:
    folder, shard, start, n, size = args
    rng = np.random.default_rng(shard)
    rows: dict[str, list] = {f.name: [] for f in DOWNLOAD_SCHEMA}
    for i in range(start, start + n):
        short = size // 2 if i % 10 == 9 else size
        long = int(rng.integers(short, short * 3 // 2 + 1))
        w, h = (long, short) if i % 2 else (short, long)
        row = dict(key=f"b-{i:07d}", dataset="bench", url=f"http://x/{i}.jpg", caption=f"photo {i}", width=w, height=h,
                   original_width=w, original_height=h, status="success", image=photo(w, h, i))
        for k in rows:
            rows[k].append(row.get(k))
    pq.write_table(to_arrow(rows, DOWNLOAD_SCHEMA), Path(folder) / f"shards/{shard:05d}.parquet", row_group_size=IMAGE_ROW_GROUP)


def make_download(folder: Path, first: int, n: int, size: int) -> int:
    """`folder` as a finished download stage of images first..first+n (made once: reused when there)."""
    stage = folder / "download"
    if (stage / "_MANIFEST.json").exists():
        return sum(o.get("rows") or 0 for o in json.loads((stage / "_MANIFEST.json").read_text())["outputs"])
    (stage / "shards").mkdir(parents=True, exist_ok=True)
    jobs = [(str(stage), first // SHARD_ROWS + k, first + k * SHARD_ROWS, min(SHARD_ROWS, n - k * SHARD_ROWS), size)
            for k in range((n + SHARD_ROWS - 1) // SHARD_ROWS)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_shard, jobs, chunksize=1)
    atomic_write_json(stage / "_MANIFEST.json", {"fingerprint": "bench", "outputs": describe_outputs(LocalStore(stage.parent), stage.name)})
    return n


# ---- the three ways -------------------------------------------------------------------------------------


def context(run_dir: Path, name: str, config, need: str, resources: Resources) -> StageContext:
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, kind=name, config=config, resources=resources, stage_dir=run_dir / name, run_dir=run_dir,
                        needs=[need], fingerprint="bench", dataset_files={}, workflow_path=run_dir / "workflow.yaml", profile="bench")


def run_dir_for(data: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "download").symlink_to(data / "download")
    return out


def record(ctx: StageContext) -> None:
    atomic_write_json(ctx.stage_dir / "_MANIFEST.json", {"fingerprint": "bench", "outputs": describe_outputs(ctx.store, ctx.name)})


def source_batch(s, run_dir) -> dict[str, list]:
    return {"path": [s.path], SRC: [s.id], SRC_FILE: [s.ref], RUN: [str(run_dir)]}


def filter_one(args) -> None:
    run_dir, source, cfg = args
    read_process_write(source_batch(source, run_dir), fn=filter_stage.filter_batch, run=str(run_dir), stage="filter",
                       fn_kwargs={"min_short_edge": cfg.min_short_edge, "max_aspect_ratio": cfg.max_aspect_ratio,
                                  "verify_decode": cfg.verify_decode, "max_pixels": cfg.max_pixels},
                       split=SplitByReason(filter_stage.KEPT_SCHEMA, filter_stage.REJECTED_SCHEMA),
                       columns=filter_stage.COLUMNS, rows_per_block=cfg.batch_size)


_WORKERS: dict = {}


def tokenize_one(args) -> None:
    """What the stage's actor does for one source on CPU, in this process (one encoder per process and run)."""
    run_dir, source, cfg = args
    if run_dir not in _WORKERS:
        _WORKERS[run_dir] = SourceWorker(
            pretokenize.Encoder, {"cfg": cfg, "cpus": 1}, run=run_dir, stage="tokenize", split=pretokenize.Split(cfg.resolutions),
            columns=None, rows_per_block=cfg.batch_size, rows_per_part=cfg.rows_per_part, prepare=pretokenize.prepare_crops,
            prepare_kwargs={"run": run_dir, "resolutions": cfg.resolutions})
    _WORKERS[run_dir](source_batch(source, run_dir))


def run_local(run_dir: Path, cfgs, pool=None) -> None:
    fcfg, tcfg = cfgs
    each = pool.map if pool is not None else (lambda fn, xs, chunksize=1: [fn(x) for x in xs])
    fctx = context(run_dir, "filter", fcfg, "download", Resources())
    record_pixel_files(fctx)
    each(filter_one, [(str(run_dir), s, fcfg) for s in input_sources(fctx)], chunksize=1)
    record(fctx)
    tctx = context(run_dir, "tokenize", tcfg, "filter", Resources())
    each(tokenize_one, [(str(run_dir), s, tcfg) for s in input_sources(tctx)], chunksize=1)


def run_ray(run_dir: Path, cfgs) -> None:
    fcfg, tcfg = cfgs
    fctx = context(run_dir, "filter", fcfg, "download", Resources(cpus=1, concurrency=2))
    filter_stage.run(fctx)
    record(fctx)
    pretokenize.run(context(run_dir, "tokenize", tcfg, "filter", Resources(cpus=0.75, concurrency=2)))


# ---- measuring -------------------------------------------------------------------------------------------

def outputs(run_dir: Path, size: int) -> tuple[list[str], dict[str, tuple]]:
    kept = pq.read_table(sorted((run_dir / "filter/shards").glob("*.parquet")), columns=["key"]).column("key").to_pylist()
    t = pq.read_table(sorted((run_dir / f"tokenize/{size}").glob("*.parquet")), columns=["key", "codes"]).to_pydict()
    return sorted(kept), dict(zip(t["key"], map(tuple, t["codes"])))


def measure(name: str, fn, warm: Path, full: Path, n_warm: int, n_full: int, work: Path, repeat: int, guard: dict) -> dict:
    """`repeat` rounds of a warm-up run and a full run; the steady state of each round (the full run's extra images
    over its extra seconds: fixed costs cancel), the median over rounds."""
    rounds = []
    for r in range(repeat):
        runs = {}
        for label, data, n in (("warmup", warm, n_warm), ("full", full, n_full)):
            run_dir = run_dir_for(data, work / f"{name}-{label}")
            before = settle(guard["below"], guard["limit_s"])
            with Meter() as m:
                fn(run_dir)
            runs[label] = {"images": n, "seconds": round(m.seconds, 2), "cpu_s": round(m.cpu_s, 1),
                           "load_before": round(before, 3), "load_max": round(m.load_max, 2),
                           "load_mean": round(m.load_mean, 2),
                           "cpu_s_by_operator": {k: round(v, 1) for k, v in sorted(m.by_op.items(), key=lambda kv: -kv[1])
                                                 if v >= 0.05}}
            print(f"  {name} round {r + 1} {label}: {n} images in {m.seconds:.1f} s, {m.cpu_s:.0f} CPU-s, load before "
                  f"{before:.2f}, during {m.load_mean:.2f} (max {m.load_max:.2f})", flush=True)
        w, f = runs["warmup"], runs["full"]
        steady = (f["images"] - w["images"]) / (f["seconds"] - w["seconds"])
        runs.update(steady_images_per_s=round(steady, 1), startup_s=round(w["seconds"] - w["images"] / steady, 2),
                    cpu_s_per_image=round((f["cpu_s"] - w["cpu_s"]) / (f["images"] - w["images"]), 4))
        rounds.append(runs)
    med = lambda key: round(statistics.median(r[key] for r in rounds), 4)  # noqa: E731
    return {"steady_images_per_s": med("steady_images_per_s"), "startup_s": med("startup_s"),
            "cpu_s_per_image": med("cpu_s_per_image"), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=512, help="short edge of the images (and the tokenize resolution)")
    ap.add_argument("--warmup", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=2, help="rounds per engine (the median is reported)")
    ap.add_argument("--settle-below", type=float, default=0.8, help="1-min load average a run waits for")
    ap.add_argument("--settle-limit", type=float, default=240.0, help="seconds a run waits for it at most")
    ap.add_argument("--contended-above", type=float, default=1.0,
                    help="a run starting above this load (after the wait) means another workload: no ratio")
    ap.add_argument("--engines", default=",".join(ENGINES), help="which to run (ratios need all three)")
    ap.add_argument("--data", help="keep the generated input here (reused when there)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["SIMPLEAR_DATA_STATS"] = "1"
    stats = StatsLog()
    cfgs = configs(args.size)
    guard = {"below": args.settle_below, "limit_s": args.settle_limit}
    data = Path(args.data or tempfile.mkdtemp(prefix="bench-data-input-"))
    t0 = time.perf_counter()
    n_warm = make_download(data / f"warm-{args.size}-{args.warmup}", 10**7, args.warmup, args.size)
    n_full = make_download(data / f"full-{args.size}-{args.images}", 0, args.images, args.size)
    print(f"input: {n_warm} + {n_full} JPEGs at {args.size} px ({time.perf_counter() - t0:.0f} s to make or find)", flush=True)
    warm, full = data / f"warm-{args.size}-{args.warmup}", data / f"full-{args.size}-{args.images}"

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    results = {}
    try:
        if "ray_data" in engines:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            run_ray(run_dir_for(warm, work / "ray-start"), cfgs)  # the cluster warm: worker processes started, imports done
            stats.records.clear()
            results["ray_data"] = measure("ray_data", lambda d: run_ray(d, cfgs), warm, full, n_warm, n_full, work,
                                          args.repeat, guard)
            results["ray_data"]["stats_last_full_run"] = stats.records[-2:]
            ray.shutdown()
        if "single_loop" in engines:
            results["single_loop"] = measure("single_loop", lambda d: run_local(d, cfgs), warm, full, n_warm, n_full,
                                             work, args.repeat, guard)
        if "pool_2" in engines:
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                pool.map(time.sleep, [0.1, 0.1])  # both started
                results["pool_2"] = measure("pool_2", lambda d: run_local(d, cfgs, pool), warm, full, n_warm, n_full,
                                            work, args.repeat, guard)
        found = {k: outputs(work / f"{k}-full", args.size) for k in results}
        ref = next(iter(found.values()))
        same = all(v == ref for v in found.values())
        kept, coded = len(ref[0]), len(ref[1])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    rate = {k: v["steady_images_per_s"] for k, v in results.items()}
    runs = [run for r in results.values() for rnd in r["rounds"] for run in (rnd["warmup"], rnd["full"])]
    start_max = max(run["load_before"] for run in runs)
    contended = start_max > args.contended_above
    why_not = ("a run started at a load average of %.2f after the wait (another workload was running: the engines "
               "did not have the same machine)" % start_max if contended else
               None if len(results) == len(ENGINES) else "not every engine ran")
    ratio = lambda key, b: None if why_not else round(results["ray_data"][key] / results[b][key], 2)  # noqa: E731
    summary = {"speedup_vs_loop": ratio("steady_images_per_s", "single_loop"),
               "speedup_vs_pool": ratio("steady_images_per_s", "pool_2"),
               "cpu_per_image_vs_loop": ratio("cpu_s_per_image", "single_loop")}
    summary.update({
        "load_avg": {"before_max": round(start_max, 2), "during_max": round(max(run["load_max"] for run in runs), 2)},
        "contended": contended, "no_ratio_because": why_not,
        "same_outputs": same, "images": n_full, "warmup_images": n_warm, "size": args.size, "kept": kept, "tokenized": coded,
        "cpus": os.cpu_count(), **results,
    })
    print(json.dumps(summary, indent=2))
    line = (f"filter + tokenize, {n_full} JPEGs at {args.size} px, median of {args.repeat} rounds: steady state "
            + ", ".join(f"{k} {v} img/s" for k, v in rate.items()))
    if why_not:
        line += f"; no ratio: {why_not}"
    else:
        line += (f": {summary['speedup_vs_loop']}x the loop, {summary['speedup_vs_pool']}x the pool, CPU per image "
                 f"{summary['cpu_per_image_vs_loop']}x the loop's")
    print(f"{line}; outputs equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if same else 1


class StatsLog(logging.Handler):
    """Keeps the stages' `Ray Data stats` log records (`SIMPLEAR_DATA_STATS`): per-operator wall and CPU times."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[str] = []
        log = logging.getLogger("simplear.stage")
        log.setLevel(logging.INFO)
        log.addHandler(self)

    def emit(self, record) -> None:
        msg = record.getMessage()
        if "Ray Data stats" in msg:
            self.records.append(msg)


if __name__ == "__main__":
    sys.exit(main())
