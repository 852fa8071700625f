"""download: a data set's images and captions into Parquet shards, every input row kept, failures with a status and reason.

- `url_list` and `generated` sources (`url_shards.py`): the list planned into shards once, each shard
  downloaded by img2dataset's own per-shard downloader in a Ray task of ours (concurrency and retries
  are the stage's), committed whole to `shards/NNNNN.parquet`. The demo set is generated on the stage's
  node (`demo_set`) and served on loopback for the run. URLs are fetched by `fetch.py` (http(s) only, no
  internal address unless the manifest opts in, bodies capped at `max_image_bytes`).
- `archives` sources (SA-1B, JourneyDB; `archives.py`): one Ray Data task per local archive writes
  `shards/<archive>.parquet`; no member is read past `max_member_bytes`, a sparse one not at all.

The run dir may be a folder or object storage: everything the stage keeps is under its stage folder, which it
and its tasks open as a store of its own (`open_store` of its path or URI), and every file is committed whole
(`manifest.committed`). The data set's own files (lists, archives) are read where the manifest says.

Output schema (`schema.py`): `key` (img2dataset's key prefixed with the data set's name, so keys stay
unique when several downloads feed one filter), `dataset, url, caption, width, height, original_width,
original_height, status, error_message, reason, sha256, extra` (JSON of the manifest's additional
columns and of what reading found, e.g. `caption_invalid_utf8`), `image` (bytes, upright, null when the
download failed).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from pipelines.download.archives import ingest_archives
from pipelines.download.schema import SCHEMA, classify, shard_keys
from pipelines.download.url_shards import download_all, plan_shards, settings_of
from simplear.config import StrictModel
from simplear.datasets import (ArchiveSource, DemoShapesParams, GeneratedSource, UrlListSource, check_dataset_name,
                               load_dataset_manifest)
from simplear.storage import Store, open_store
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.manifest import recorded_entries, staging_dir
from simplear.workflow.registry import register_stage


class DownloadConfig(StrictModel):
    """img2dataset's settings (same names); `resize_mode: "no"` keeps the original pixels for the later stages."""

    dataset: str
    number_sample_per_shard: int = Field(10_000, ge=1)
    thread_count: int = Field(64, ge=1)
    timeout: int = Field(10, ge=1)
    retries: int = Field(0, ge=0)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "no"
    image_size: int = Field(1024, ge=8)
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int | None = Field(None, description="default: 95 for jpg/webp, 3 (zlib level) for png")
    skip_reencode: bool = True
    min_image_size: int = Field(0, ge=0)
    max_image_area: float | None = Field(None, gt=0)
    max_aspect_ratio: float | None = Field(None, gt=0)
    user_agent_token: str | None = "img2dataset"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    serve_host: str = Field(
        "127.0.0.1",
        description="generated sets: the address the stage's HTTP server listens on and img2dataset fetches from; "
        "loopback reaches download tasks on the stage's own node only (the demo's single machine)",
    )
    rows_per_part: int = Field(2_000, ge=1, description="archives: rows held in memory per write")
    max_shard_retry: int = Field(2, ge=0, description="url lists: tries after the first for a failed shard, then the stage fails")
    max_decode_pixels: int = Field(178_956_970, ge=1, description="images larger than this are rejected from their header, "
                                   "before any decoder sees them (PIL's bomb limit; cv2's limit is set to it too)")
    max_image_bytes: int = Field(64 << 20, ge=1, description="url lists: a response body larger than this is refused "
                                 "(from its Content-Length, else by a capped read): a failed row, reason too_large")
    max_member_bytes: int = Field(64 << 20, ge=1, description="archives: an image member larger than this (its size "
                                  "once expanded) is not read: a failed row, reason too_large")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str, info: ValidationInfo) -> str:
        return check_dataset_name(value, info.context)

    @field_validator("encode_quality")
    @classmethod
    def _quality(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("encode_format") == "png" and not 0 <= value <= 9:
            raise ValueError("for png, encode_quality is the zlib level, 0-9")
        return value


@contextmanager
def demo_set(stage: Store, params: DemoShapesParams) -> Iterator[Path]:
    """The generated demo set in a folder of this node, where its server reads it: the stage folder's `_source/`
    on a POSIX run dir (kept, so a rerun draws nothing again), node-local scratch on object storage (drawn again
    each run: it is deterministic in its params, so the plan a rerun reuses still matches it)."""
    from pipelines import demo_shapes

    scratch = None if stage.is_local else Path(tempfile.mkdtemp(prefix="demo-", dir=staging_dir()))
    folder = scratch or stage.local_root / "_source"
    try:
        demo_shapes.generate(folder, params)
        yield folder
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _download_url_list(ctx: StageContext, stage: Store, cfg: DownloadConfig, ds: UrlListSource | GeneratedSource) -> dict:
    seconds = {}
    t0 = time.time()
    settings = settings_of(cfg)
    if isinstance(ds, GeneratedSource):
        from pipelines import demo_shapes

        with demo_set(stage, ds.params) as source:
            seconds["generate"] = round(time.time() - t0, 3)
            extra_cols = ["kind"]
            with demo_shapes.serve(source, cfg.serve_host) as base_url:
                ctx.log.info("%s: serving %s at %s", ctx.name, source, base_url)
                # planned by path: the server's port is new each run
                plan = plan_shards(stage.uri, ["urls.parquet"], "parquet", "path", "caption", extra_cols, None,
                                   cfg.number_sample_per_shard, folder=source)
                settings["url_prefix"] = base_url + "/"
                settings["allow_private_addresses"] = True  # the stage's own server, on `serve_host`
                t1 = time.time()
                metrics = download_all(ctx, stage, plan, settings, cfg.dataset, extra_cols, cfg.max_shard_retry)
    else:
        extra_cols = list(ds.save_additional_columns)
        settings["rotation_col"] = ds.rotation_col
        settings["allow_private_addresses"] = ds.allow_private_addresses
        files = list_files(ds)
        plan = plan_shards(stage.uri, files, ds.input_format, ds.url_col, ds.caption_col, extra_cols, ds.column_names,
                           cfg.number_sample_per_shard)
        t1 = time.time()
        metrics = download_all(ctx, stage, plan, settings, cfg.dataset, extra_cols, cfg.max_shard_retry)
    seconds["download"] = round(time.time() - t1, 3)
    return {"seconds_by_step": seconds, **metrics}


def shard_counts(stage: Store) -> dict:
    """Rows by status and by reason over every converted shard (columns only, no image bytes read)."""
    status: Counter = Counter()
    reasons: Counter = Counter()
    rows = 0
    fs, root = stage.filesystem()
    for key in shard_keys(stage):
        t = pq.read_table(f"{root}/{key}", columns=["status", "reason"], filesystem=fs)
        rows += t.num_rows
        status.update(t.column("status").to_pylist())
        reasons.update(r for r in t.column("reason").to_pylist() if r)
    return {"rows": rows, "by_status": dict(sorted(status.items())), "failed_by_reason": dict(sorted(reasons.items()))}


def shard_progress(location: str) -> str | None:
    """How many shards are converted so far (a running or interrupted download)."""
    n = len(shard_keys(open_store(location)))
    return f"{n} shards converted" if n else None


def list_files(ds: UrlListSource) -> list[str]:
    return sorted(glob.glob(ds.resolve(ds.url_list))) or [ds.resolve(ds.url_list)]


def source_files(cfg: DownloadConfig, dataset_files: dict) -> dict[str, list]:
    """The archives or URL lists the stage reads, with their size and mtime: when they change, a done download
    is refreshed in place (a re-downloaded or added archive is ingested, the others kept)."""
    ds = load_dataset_manifest(dataset_files[cfg.dataset])
    if isinstance(ds, ArchiveSource):
        paths = glob.glob(ds.resolve(ds.archives))
    elif isinstance(ds, UrlListSource):
        paths = [p for p in list_files(ds) if os.path.exists(p)]
    else:
        return {}
    return {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in sorted(paths)}


@register_stage("download", DownloadConfig, version=3, operational=("thread_count", "rows_per_part", "max_shard_retry"),
                progress=shard_progress, sources=source_files, object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: DownloadConfig = ctx.config
    ds = load_dataset_manifest(ctx.dataset_files[cfg.dataset])
    stage = open_store(ctx.store.child(ctx.name))
    before = set(shard_keys(stage))
    t0 = time.time()
    if isinstance(ds, ArchiveSource):
        metrics = ingest_archives(ctx, stage, cfg.dataset, cfg.rows_per_part, cfg.max_decode_pixels, cfg.max_member_bytes)
    else:
        metrics = _download_url_list(ctx, stage, cfg, ds)
    elapsed = time.time() - t0
    new = [key for key in shard_keys(stage) if key not in before]
    files = recorded_entries(ctx.store, ctx.name)  # the writing tasks' entries: no shard is read again for its rows
    rows_this_run = sum(files[key]["rows"] for key in new)
    metrics.update(shard_counts(stage))
    metrics.update(
        dataset=cfg.dataset,
        source=ds.source,
        shards=len(before) + len(new),
        shards_this_run=len(new),
        rows_this_run=rows_this_run,
        seconds_this_run=round(elapsed, 3),
        rows_per_s=round(rows_this_run / elapsed, 2) if rows_this_run and elapsed > 0 else None,
    )
    ctx.log.info("%s: %s", ctx.name, metrics["by_status"])
    return StageResult(metrics=metrics, files=files)


__all__ = ["DownloadConfig", "SCHEMA", "classify"]
