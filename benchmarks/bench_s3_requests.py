"""What a run on object storage costs in requests: the demo's data stages and a short pretrain with `run_dir: s3://`,
against the tests' S3 server (moto on loopback, counting every request any client makes), per stage.

Object storage bills per request; what has to stay bounded at scale is requests per output part (a part holds
hundreds of rows) and per input row (it must be far below one: receipts are per part, never per row). Each stage's
requests are those on keys under its folder plus its listings; the run lock's own (acquire, heartbeats, the fence
check before every commit) are reported apart, as is Ray Train's checkpoint traffic (inside the training stage's
folder, so counted with it).

    .venv/bin/python benchmarks/bench_s3_requests.py [--count 150] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipelines_support import DATA_STAGES, data_workflow  # noqa: E402
from s3_server import launch  # noqa: E402

def requests(url: str) -> list[tuple[str, str, int]]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_requests", timeout=10) as r:
        return [tuple(x) for x in json.loads(r.read())]


def by_stage(counts, prefix: str, stages: list[str]) -> dict[str, Counter]:
    """Requests per stage (its folder's keys and listings), the lock's, and the rest (bucket checks)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for op, path, n in counts:
        rel = path[len(prefix):].lstrip("/") if path.startswith(prefix) else None
        head = rel.split("/")[0] if rel else ""
        who = head if head in stages else "lock" if head == "_LOCK.json" else "other"
        out[who][op] += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=150, help="demo images downloaded")
    parser.add_argument("--steps", type=int, default=20, help="pretrain steps (a checkpoint every half)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    proc, url, env = launch(str(folder / "s3.log"))
    os.environ.update(env)
    try:
        import boto3
        import yaml

        from simplear.storage import open_store
        from simplear.workflow.engine import run_workflow, select
        from simplear.workflow.spec import load_workflow

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        run_dir = "s3://bench/runs/demo"
        train = {"steps": args.steps, "checkpoint_every": max(1, args.steps // 2)}
        path = data_workflow(folder / "wf", count=args.count, keep=(*DATA_STAGES, "pretrain"),
                             stages={"pretrain": {"config": {"train": train}}})
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "run_dir": run_dir}, sort_keys=False))
        wf = load_workflow(path)
        stages = list(wf.stages)
        t0 = time.time()
        run_workflow(wf, select(wf))
        seconds = time.time() - t0
        counts = by_stage(requests(url), "/bench/runs/demo", stages)
        store = open_store(run_dir)
        rows, figures = {}, {}
        for name in stages:
            manifest = store.read_json(f"{name}/_MANIFEST.json")
            rows[name] = manifest.get("rows", 0)
            inputs = sum(rows.get(n, 0) for n in wf.stages[name].needs)
            parts = len(manifest["outputs"])
            total = sum(counts[name].values())
            figures[name] = {"requests": total, "by_operation": dict(sorted(counts[name].items())), "input_rows": inputs,
                             "output_files": parts, "requests_per_output_file": round(total / max(parts, 1), 2),
                             "requests_per_input_row": round(total / inputs, 3) if inputs else None}
        result = {"count": args.count, "pretrain_steps": args.steps, "seconds": round(seconds, 1), "stages": figures,
                  "lock": dict(counts["lock"]), "other": dict(counts["other"])}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{'stage':<10} {'requests':>9} {'input rows':>10} {'output files':>12} {'per file':>9} {'per input row':>13}")
    for name, f in figures.items():
        per_row = "" if f["requests_per_input_row"] is None else f"{f['requests_per_input_row']:.3f}"
        print(f"{name:<10} {f['requests']:>9} {f['input_rows']:>10} {f['output_files']:>12} "
              f"{f['requests_per_output_file']:>9.2f} {per_row:>13}")
    print(f"lock: {sum(result['lock'].values())} requests {result['lock']}; other: {result['other']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
