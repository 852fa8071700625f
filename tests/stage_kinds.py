"""Stage kinds registered by the tests (loaded through `plugins:`), to exercise the engine without the product's stages."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from simplear.config import StrictModel
from simplear.storage import open_parent
from simplear.workflow import StageContext, StageResult, register_stage
from simplear.workflow.manifest import commit_json


class ShardsConfig(StrictModel):
    shards: int = 3
    rows_per_shard: int = 4
    seconds_per_shard: float = 0.0
    value: int = 0  # changes the outputs, so downstream stages see a new input
    fail: bool = False
    fail_after: int | None = None  # raise once this many shards exist (a crash mid-stage; operational)


def _read_inputs(ctx: StageContext) -> list[int]:
    values = []
    for need in ctx.needs:
        for f in ctx.input_files(need):
            values += pq.read_table(f, filesystem=ctx.filesystem)["x"].to_pylist()
    return values


def shard_log(store, stage: str) -> list[dict]:
    """Which process wrote which shard, in the order they were written (bookkeeping objects under `_log/`)."""
    return [store.read_json(item.key) for item in store.list(f"{stage}/_log")]


def shards_progress(location: str) -> str | None:
    store, stage = open_parent(location)
    n = sum(1 for item in store.list(stage) if item.key.rsplit("/", 1)[-1].startswith("part-"))
    return f"{n} shards written" if n else None


@register_stage("test_shards", ShardsConfig, operational=("seconds_per_shard", "fail_after"), progress=shards_progress,
                object_store=True)
def run_shards(ctx: StageContext) -> StageResult:
    """Writes `shards` Parquet shards one by one, each atomically; a rerun writes only the missing ones."""
    cfg = ctx.config
    if cfg.fail:
        raise RuntimeError("asked to fail")
    upstream = sum(_read_inputs(ctx))
    written = 0
    for i in range(cfg.shards):
        rel = f"part-{i:05d}.parquet"
        if ctx.has_output(rel):
            continue
        if cfg.fail_after is not None and i >= cfg.fail_after:
            raise RuntimeError(f"asked to fail after {cfg.fail_after} shards")
        time.sleep(cfg.seconds_per_shard)
        rows = [cfg.value * 1000 + upstream + i * cfg.rows_per_shard + j for j in range(cfg.rows_per_shard)]
        with ctx.output(rel) as tmp:
            pq.write_table(pa.table({"x": rows}), tmp)
        written += 1
        commit_json(ctx.store, ctx.key(f"_log/{time.time_ns():020d}-{os.getpid()}.json"), {"pid": os.getpid(), "shard": i})
    return StageResult(metrics={"shards_written": written})


@register_stage("test_folder_only", ShardsConfig)
def run_folder_only(ctx: StageContext) -> StageResult:
    """Writes its stage folder with plain file calls: a kind that cannot run on object storage."""
    (ctx.stage_dir / "out.txt").write_text("local")
    return StageResult()
