"""download: a data set's images and captions into Parquet shards, every failure kept with its status and reason.

- `url_list` and `generated` sources: img2dataset with its `ray` distributor (one Ray task per shard),
  `incremental_mode` so a rerun downloads only shards without their `_stats.json`. Raw shards land in
  `_img2dataset/`; each finished one is converted to `shards/<shard>.parquet` (schema below) and its raw
  Parquet deleted. The demo set is generated under `_source/` and served on loopback for the run.
- `archives` sources (SA-1B, JourneyDB): one Ray Data task per local archive writes `shards/<archive>.parquet`.

Output schema: `key` (img2dataset's key prefixed with the data set's name, so keys stay unique when
several downloads feed one filter), `dataset, url, caption, width, height, original_width,
original_height, status, error_message, reason, sha256, extra` (JSON of the manifest's additional
columns), `image` (bytes, null when the download failed).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from simplear.config import StrictModel
from simplear.datasets import ArchiveSource, GeneratedSource, UrlListSource, check_dataset_name, load_dataset_manifest
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.manifest import atomic_path, record_entry, recorded_entries
from simplear.workflow.registry import register_stage

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("reason", pa.string()),
        ("sha256", pa.string()),
        ("extra", pa.string()),
        ("image", pa.binary()),
    ]
)
RAW = "_img2dataset"
SHARDS = "shards"


class DownloadConfig(StrictModel):
    """img2dataset's settings (same names); `resize_mode: "no"` keeps the original pixels for the later stages."""

    dataset: str
    distributor: Literal["ray", "multiprocessing"] = "ray"
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
    rows_per_part: int = Field(2_000, ge=1, description="archives: Parquet row group size")

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


def classify(status: str | None, error: str | None) -> str | None:
    """img2dataset's free-text error as a short reason to count by."""
    if status == "success":
        return None
    e = (error or "").lower()
    if e.startswith("http error "):
        return "http_" + e.split()[2].rstrip(":")
    rules = [
        ("timed out", "timeout"),
        ("!buf.empty()", "empty_file"),
        ("cv_io_max_image_pixels", "too_large"),
        ("image area too large", "too_large"),
        ("decompression bomb", "too_large"),
        ("image decoding error", "undecodable"),
        ("cannot identify image", "undecodable"),
        ("truncated", "truncated"),
        ("image too small", "too_small"),
        ("aspect ratio too large", "aspect_ratio"),
        ("hash mismatch", "hash_mismatch"),
        ("x-robots-tag", "opted_out"),
        ("urlopen error", "connection_error"),
        ("connection", "connection_error"),
    ]
    for needle, reason in rules:
        if needle in e:
            return reason
    return "other"


# ---- url lists (img2dataset) -----------------------------------------------------------------------


def _convert_shard(raw_parquet: str, out_rel: str, stage_dir: str, dataset: str, encode_format: str, extra_cols: list[str]) -> str:
    """One img2dataset shard to the stage's schema, written whole; the raw file is then deleted."""
    stage = Path(stage_dir)
    table = pq.read_table(raw_parquet)
    cols = set(table.column_names)
    n = table.num_rows

    def col(name):
        return table.column(name).to_pylist() if name in cols else [None] * n

    status, errors = col("status"), col("error_message")
    extras = [{c: v for c, v in zip(extra_cols, vals)} for vals in zip(*(col(c) for c in extra_cols))] if extra_cols else [{}] * n
    data = {
        "key": [f"{dataset}-{k}" for k in col("key")],
        "dataset": [dataset] * n,
        "url": col("url"),
        "caption": col("caption"),
        "width": col("width"),
        "height": col("height"),
        "original_width": col("original_width"),
        "original_height": col("original_height"),
        "status": status,
        "error_message": [e.strip() if isinstance(e, str) else e for e in errors],
        "reason": [classify(s, e) for s, e in zip(status, errors)],
        "sha256": col("sha256"),
        "extra": [json.dumps(x, default=str) if x else None for x in extras],
        "image": col(encode_format),
    }
    from pipelines.resumable_parquet import to_arrow

    with atomic_path(stage / out_rel) as tmp:
        pq.write_table(to_arrow(data, SCHEMA), tmp)
        record_entry(stage, tmp, out_rel)
    os.unlink(raw_parquet)
    return out_rel


def _img2dataset(ctx: StageContext, cfg: DownloadConfig, url_list: str, input_format: str, url_col: str,
                 caption_col: str | None, extra_cols: list[str]) -> None:
    import img2dataset

    quality = cfg.encode_quality if cfg.encode_quality is not None else (3 if cfg.encode_format == "png" else 95)
    img2dataset.download(
        url_list=url_list,
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra_cols or None,
        output_folder=str(ctx.stage_dir / RAW),
        output_format="parquet",
        distributor=cfg.distributor,
        processes_count=ctx.resources.concurrency,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.number_sample_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,
        resize_mode=cfg.resize_mode,
        image_size=cfg.image_size,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=quality,
        skip_reencode=cfg.skip_reencode,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area or float("inf"),
        max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives,
        incremental_mode="incremental",
        enable_wandb=False,
        extract_exif=False,
    )


def _convert_finished(ctx: StageContext, cfg: DownloadConfig, extra_cols: list[str]) -> None:
    import ray

    raw = ctx.stage_dir / RAW
    todo = []
    for stats in sorted(raw.glob("*_stats.json")):
        shard = stats.name.split("_")[0]
        raw_parquet = raw / f"{shard}.parquet"
        out_rel = f"{SHARDS}/{shard}.parquet"
        if (ctx.stage_dir / out_rel).exists():
            raw_parquet.unlink(missing_ok=True)
        elif raw_parquet.exists():
            todo.append((str(raw_parquet), out_rel))
    convert = ray.remote(_convert_shard).options(**ctx.resources.ray_options(), max_retries=2)
    refs = [convert.remote(p, rel, str(ctx.stage_dir), cfg.dataset, cfg.encode_format, extra_cols) for p, rel in todo]
    ray.get(refs)


def _download_url_list(ctx: StageContext, cfg: DownloadConfig, ds: UrlListSource | GeneratedSource) -> dict:
    seconds = {}
    t0 = time.time()
    if isinstance(ds, GeneratedSource):
        from pipelines import demo_shapes

        source = ctx.stage_dir / "_source"
        demo_shapes.generate(source, ds.params)
        seconds["generate"] = round(time.time() - t0, 3)
        extra_cols = ["kind"]
        with demo_shapes.serve(source, cfg.serve_host) as base_url:
            urls = demo_shapes.url_list(source, base_url)
            ctx.log.info("%s: serving %s at %s", ctx.name, source, base_url)
            t1 = time.time()
            _img2dataset(ctx, cfg, str(urls), "parquet", "url", "caption", extra_cols)
    else:
        extra_cols = list(ds.save_additional_columns)
        t1 = time.time()
        _img2dataset(ctx, cfg, ds.resolve(ds.url_list), ds.input_format, ds.url_col, ds.caption_col, extra_cols)
    seconds["img2dataset"] = round(time.time() - t1, 3)
    t2 = time.time()
    _convert_finished(ctx, cfg, extra_cols)
    seconds["convert"] = round(time.time() - t2, 3)
    return {"seconds_by_step": seconds}


# ---- local archives (SA-1B, JourneyDB) ------------------------------------------------------------

_CAPTIONS: dict[str, dict[str, str]] = {}


def _dig(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _member_key(name: str, match: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.lstrip("/")
    if match == "path":
        return name
    base = os.path.basename(name)
    return os.path.splitext(base)[0] if match == "stem" else base


def load_captions(ds: ArchiveSource) -> dict[str, str]:
    """The side file of captions as {member key: caption}, read once per worker process."""
    if ds.captions is None:
        return {}
    spec = ds.captions
    path = ds.resolve(spec.path)
    if path in _CAPTIONS:
        return _CAPTIONS[path]
    records: list[dict]
    if spec.format == "jsonl":
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    elif spec.format == "json":
        loaded = json.loads(Path(path).read_text())
        records = loaded if isinstance(loaded, list) else [{spec.key_field: k, spec.caption_field: v} for k, v in loaded.items()]
    elif spec.format == "parquet":
        records = pq.read_table(path).to_pylist()
    else:
        import csv

        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if spec.format == "tsv" else ","))
    out = {}
    for r in records:
        key, caption = _dig(r, spec.key_field), _dig(r, spec.caption_field)
        if key is not None and caption is not None:
            out[_member_key(str(key), spec.match)] = str(caption)
    _CAPTIONS[path] = out
    return out


def _failed_read(dataset: str, key: str, archive: str, reason: str, err: Exception) -> dict:
    return {"key": f"{dataset}-{key}", "dataset": dataset, "url": f"file://{archive}", "status": "failed_to_read",
            "reason": reason, "error_message": f"{type(err).__name__}: {err}"[:500]}


def _archive_rows(archive: str, stem: str, dataset: str, ds: ArchiveSource, captions: dict[str, str]):
    """One row per image member; an unreadable or truncated archive ends with a failed row saying so."""
    from PIL import Image

    exts = tuple(e.lower() for e in ds.image_extensions)
    match = ds.captions.match if ds.captions else "basename"
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        yield _failed_read(dataset, f"{stem}-archive", archive, "bad_archive", e)
        return
    index = 0
    with tar:
        members = iter(tar)
        while True:
            try:
                member = next(members, None)
                if member is None:
                    return
                if not member.isfile() or not member.name.lower().endswith(exts):
                    continue
                data = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                yield _failed_read(dataset, f"{stem}-{index:06d}-truncated", archive, "truncated_archive", e)
                return
            width = height = error = None
            try:
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
            except Exception as e:  # noqa: BLE001 - every bad image is recorded, never raised
                error = f"{type(e).__name__}: {e}"
            status = "success" if error is None else "failed_to_decode"
            yield {
                "key": f"{dataset}-{stem}-{index:06d}",
                "dataset": dataset,
                "url": f"file://{archive}#{member.name}",
                "caption": captions.get(_member_key(member.name, match)),
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
                "status": status,
                "error_message": error,
                "reason": None if error is None else ("empty_file" if not data else classify(status, error)),
                "sha256": hashlib.sha256(data).hexdigest(),
                "extra": json.dumps({"archive": os.path.basename(archive), "member": member.name}),
                "image": data if error is None else None,
            }
            index += 1


def _ingest_archive(batch: dict, *, stage_dir: str, dataset: str, manifest_path: str, rows_per_part: int) -> dict:
    """Ray Data task: one archive to `shards/<archive>.parquet`, written in row groups and renamed into place whole."""
    ds = load_dataset_manifest(manifest_path)
    assert isinstance(ds, ArchiveSource)
    archive, stem = str(batch["archive"][0]), str(batch["stem"][0])
    counts: Counter = Counter()
    rel = f"{SHARDS}/{stem}.parquet"
    with atomic_path(Path(stage_dir) / rel) as tmp:
        _write_archive_rows(tmp, archive, stem, dataset, ds, counts, rows_per_part)
        record_entry(Path(stage_dir), tmp, rel)
    return {"archive": [archive], "counts": [json.dumps(dict(counts))]}


def _write_archive_rows(tmp: Path, archive: str, stem: str, dataset: str, ds: ArchiveSource, counts: Counter,
                        rows_per_part: int) -> None:
    from pipelines.resumable_parquet import to_arrow

    rows: list[dict] = []
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for row in _archive_rows(archive, stem, dataset, ds, load_captions(ds)):
            counts[row["status"] if row["reason"] is None else f"{row['status']}:{row['reason']}"] += 1
            rows.append(row)
            if len(rows) >= rows_per_part:
                writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA))
                rows.clear()
        if rows:
            writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA))


def _ingest_archives(ctx: StageContext, cfg: DownloadConfig, ds: ArchiveSource) -> dict:
    import ray.data

    from pipelines.resumable_parquet import safe_name

    archives = sorted(glob.glob(ds.resolve(ds.archives)))
    missing: list[str] = []
    if ds.links_file:
        with open(ds.resolve(ds.links_file)) as f:
            listed = [line.split("\t")[0].strip() for line in f if line.strip() and not line.startswith("file_name")]
        have = {os.path.basename(a) for a in archives}
        missing = sorted(n for n in listed if n not in have)
        if missing:
            ctx.log.warning("%s: %d archives of %s are not on disk (first: %s)", ctx.name, len(missing), ds.links_file, missing[0])
    items = [{"archive": a, "stem": safe_name(Path(a).name.split(".")[0])} for a in archives]
    todo = [it for it in items if not (ctx.stage_dir / SHARDS / f"{it['stem']}.parquet").exists()]
    ctx.log.info("%s: %d archives, %d to ingest", ctx.name, len(items), len(todo))
    if todo:
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        out = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _ingest_archive,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=ctx.resources.concurrency),
            num_cpus=ctx.resources.cpus,
            fn_kwargs={"stage_dir": str(ctx.stage_dir), "dataset": cfg.dataset,
                       "manifest_path": str(ctx.dataset_files[cfg.dataset]), "rows_per_part": cfg.rows_per_part},
        )
        for _ in out.iter_batches(batch_size=None):
            pass
    return {"archives": len(items), "archives_missing": len(missing), "archives_missing_names": missing[:20]}


# ---- the stage ---------------------------------------------------------------------------------------


def shard_counts(stage_dir: Path) -> dict:
    """Rows by status and by reason over every converted shard (columns only, no image bytes read)."""
    status: Counter = Counter()
    reasons: Counter = Counter()
    rows = 0
    for f in sorted((stage_dir / SHARDS).glob("*.parquet")):
        t = pq.read_table(f, columns=["status", "reason"])
        rows += t.num_rows
        status.update(t.column("status").to_pylist())
        reasons.update(r for r in t.column("reason").to_pylist() if r)
    return {"rows": rows, "by_status": dict(sorted(status.items())), "failed_by_reason": dict(sorted(reasons.items()))}


def shard_progress(stage_dir: Path) -> str | None:
    """How many shards are converted so far (a running or interrupted download)."""
    n = len(list((stage_dir / SHARDS).glob("*.parquet")))
    return f"{n} shards converted" if n else None


@register_stage("download", DownloadConfig, version=1, operational=("distributor", "thread_count", "rows_per_part"),
                progress=shard_progress)
def run(ctx: StageContext) -> StageResult:
    cfg: DownloadConfig = ctx.config
    ds = load_dataset_manifest(ctx.dataset_files[cfg.dataset])
    (ctx.stage_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    before = {p.name for p in (ctx.stage_dir / SHARDS).glob("*.parquet")}
    t0 = time.time()
    if isinstance(ds, ArchiveSource):
        metrics = _ingest_archives(ctx, cfg, ds)
    else:
        metrics = _download_url_list(ctx, cfg, ds)
    elapsed = time.time() - t0
    new = [p for p in (ctx.stage_dir / SHARDS).glob("*.parquet") if p.name not in before]
    rows_this_run = sum(pq.ParquetFile(p).metadata.num_rows for p in new)
    metrics.update(shard_counts(ctx.stage_dir))
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
    return StageResult(metrics=metrics, files=recorded_entries(ctx.stage_dir))


__all__ = ["DownloadConfig", "SCHEMA", "classify"]
