"""Helpers of the data-stage tests: a copy of the shipped demo workflow's data stages on a smaller demo set."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from simplear.workflow.spec import deep_merge

ROOT = Path(__file__).resolve().parent.parent
DATA_STAGES = ("download", "filter", "recaption", "tokenize")


def data_workflow(folder: Path, count: int = 150, stages: dict | None = None, params: dict | None = None,
                  keep: tuple[str, ...] = DATA_STAGES) -> Path:
    """`folder/workflow.yaml`: the shipped demo profile's data stages (deep-merged with `stages`), demo set of `count` images."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load((ROOT / "workflow.yaml").read_text())
    profiles = shipped.pop("profiles", {}) or {}
    shipped.pop("default_profile", None)
    doc = deep_merge(shipped, profiles.get("demo") or {})
    doc["stages"] = {k: v for k, v in doc["stages"].items() if k in keep}
    doc = deep_merge(doc, {"stages": stages or {}})
    doc["run_dir"] = "runs"
    doc["datasets_dir"] = "datasets"
    manifest = yaml.safe_load((ROOT / "datasets_manifest/demo_shapes.yaml").read_text())
    manifest["params"].update(count=count, **(params or {}))
    (folder / "datasets").mkdir(exist_ok=True)
    (folder / "datasets/demo_shapes.yaml").write_text(yaml.safe_dump(manifest))
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_stage(stage_dir: Path, folder: str, columns: list[str] | None = None):
    """Rows of the files the stage's manifest recorded under `folder`, as a pandas frame."""
    import pandas as pd

    manifest = json.loads((stage_dir / "_MANIFEST.json").read_text())
    files = [stage_dir / o["path"] for o in manifest["outputs"] if o["path"].startswith(folder + "/") and o["path"].endswith(".parquet")]
    if not files:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([pq.read_table(f, columns=columns).to_pandas() for f in files], ignore_index=True)


def manifest_of(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "_MANIFEST.json").read_text())


def demo_rows(n: int, seed: int = 0) -> dict[str, list]:
    """`n` downloaded rows of demo images (sizes 64..), their bytes in `image`."""
    import io
    import random

    from pipelines import demo_shapes

    rng = random.Random(seed)
    colours = list(demo_shapes.PALETTE)
    rows: dict[str, list] = {}
    for i in range(n):
        fg, bg = rng.sample(colours, 2)
        shape = rng.choice(demo_shapes.SHAPES)
        w, h = 64 + 16 * (i % 4), 64 + 16 * (i % 3)
        buf = io.BytesIO()
        demo_shapes.draw(fg, shape, bg, w, h, rng).save(buf, format="PNG")
        row = dict(key=f"t-{i:04d}", dataset="t", url=f"http://x/{i}.png", caption=demo_shapes.caption_for(fg, shape, bg),
                   width=w, height=h, original_width=w, original_height=h, sha256=None, extra=None, image=buf.getvalue())
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    return rows


def write_input_stage(run_dir: Path, name: str, parts: list[dict[str, list]], schema, row_group_size: int = 4) -> None:
    """A finished stage `name` whose `shards/` hold `parts` (what a stage run by the engine would leave)."""
    from pipelines.resumable_parquet import to_arrow
    from simplear.storage.local import LocalStore
    from simplear.workflow.manifest import atomic_write_json, describe_outputs

    stage = run_dir / name
    (stage / "shards").mkdir(parents=True)
    for i, rows in enumerate(parts):
        pq.write_table(to_arrow(rows, schema), stage / f"shards/part-{i:03d}.parquet", row_group_size=row_group_size)
    atomic_write_json(stage / "_MANIFEST.json", {"fingerprint": name, "outputs": describe_outputs(LocalStore(stage.parent), stage.name)})


def write_filtered_stage(run_dir: Path, rows: dict[str, list], name: str = "filter") -> None:
    """A finished download whose shard holds `rows`' image bytes, and a finished filter `name` whose rows point
    into it (image_file / image_row) and list it in their pixels.json: what recaption and tokenize read."""
    from pipelines.download.schema import SCHEMA as DOWNLOAD_SCHEMA
    from pipelines.filter import KEPT_SCHEMA
    from pipelines.pixels import PIXELS_JSON
    from simplear.storage.local import LocalStore
    from simplear.workflow.manifest import atomic_write_json, describe_outputs

    n = len(rows["key"])
    write_input_stage(run_dir, "download", [{**rows, "status": ["success"] * n}], DOWNLOAD_SCHEMA)
    refs = {k: v for k, v in rows.items() if k != "image"}
    refs.update(image_file=["download/shards/part-000.parquet"] * n, image_row=list(range(n)))
    write_input_stage(run_dir, name, [refs], KEPT_SCHEMA)
    download = {f"download/{o['path']}": o for o in describe_outputs(LocalStore(run_dir), "download")}
    atomic_write_json(run_dir / name / PIXELS_JSON, {"files": download})
    atomic_write_json(run_dir / name / "_MANIFEST.json", {"fingerprint": name, "outputs": describe_outputs(LocalStore(run_dir), name)})


def stage_context(run_dir: Path, name: str, kind: str, config, needs: list[str], **resources):
    """A StageContext for calling a stage's run() in-process, as the engine's stage task would."""
    from simplear.workflow.context import StageContext
    from simplear.workflow.spec import Resources

    (run_dir / name).mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, kind=kind, config=config, resources=Resources(**resources), stage_dir=run_dir / name,
                        run_dir=run_dir, needs=needs, fingerprint="test", dataset_files={}, workflow_path=run_dir / "workflow.yaml",
                        profile="test")


def slow_identity(batch, *, seconds: float):
    """A stage's process step that takes its time (to see tasks overlap) and keeps every row."""
    import time

    time.sleep(seconds)
    return batch
