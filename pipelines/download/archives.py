"""Local archives (SA-1B, JourneyDB): one Ray Data task per archive writes `shards/<archive>.parquet`.

Images are put upright (EXIF orientation) and refused from their header above `max_decode_pixels`.
Each archive gets a receipt (`_archives/<stem>.json`: its size and mtime): a re-downloaded archive is
ingested again. Bad input becomes rows, never a failed stage: a truncated or unreadable archive ends
with a failed row saying so, a member name that is not UTF-8 is kept with replacement characters, and a
malformed line of a JSONL caption file is skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.download.images import upright
from pipelines.download.schema import IMAGE_ROW_GROUP, SCHEMA, SHARDS, classify
from simplear.datasets import ArchiveSource, load_dataset_manifest
from simplear.workflow.manifest import atomic_path, atomic_write_json, read_json, record_entry

log = logging.getLogger("simplear.stage.download")

RECEIPTS = "_archives"


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


def _webdataset_records(path: str, key_field: str, caption_field: str) -> list[dict]:
    """One record per stem of a webdataset-layout tar: {key_field: stem, caption_field: caption}."""
    by_stem: dict[str, dict] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = _utf8(os.path.basename(member.name))
            stem, _, ext = name.partition(".")
            try:
                data = tar.extractfile(member).read()
                if caption_field == "txt" and ext == "txt":
                    value = data.decode("utf-8", "replace").strip()
                elif caption_field != "txt" and ext == "json":
                    value = _dig(json.loads(data), caption_field)
                else:
                    continue
            except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # a damaged caption costs that caption only: the image is kept, left to recaption
            if value is not None:
                by_stem[stem] = {key_field: stem, caption_field: value}
    return list(by_stem.values())


def load_captions(ds: ArchiveSource) -> dict[str, str]:
    """The side file of captions as {member key: caption}, read once per worker process."""
    if ds.captions is None:
        return {}
    spec = ds.captions
    path = ds.resolve(spec.path)
    if path in _CAPTIONS:
        return _CAPTIONS[path]
    records: list[dict]
    if spec.format == "jsonl":  # a malformed or non-UTF-8 line costs that record only
        records, bad = [], 0
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line.decode("utf-8")))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    bad += 1
        if bad:
            log.warning("%s: %d malformed lines skipped", path, bad)
    elif spec.format == "json":
        loaded = json.loads(Path(path).read_text())
        records = loaded if isinstance(loaded, list) else [{spec.key_field: k, spec.caption_field: v} for k, v in loaded.items()]
    elif spec.format == "parquet":
        records = pq.read_table(path).to_pylist()
    elif spec.format == "webdataset":
        records = _webdataset_records(path, spec.key_field, spec.caption_field)
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


def _utf8(name: str) -> str:
    """A member name as valid UTF-8: tarfile hands undecodable bytes over as surrogates, which Parquet refuses."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _receipt(archive: str) -> dict:
    st = os.stat(archive)
    return {"archive": archive, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _archive_rows(archive: str, stem: str, dataset: str, ds: ArchiveSource, captions: dict[str, str], max_pixels: int):
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
                name = _utf8(member.name)
            except (tarfile.TarError, OSError, EOFError) as e:
                yield _failed_read(dataset, f"{stem}-{index:06d}-truncated", archive, "truncated_archive", e)
                return
            width = height = None
            image, error = upright(data, max_pixels)
            if error is None:
                try:
                    with Image.open(io.BytesIO(image)) as im:
                        width, height = im.size
                except Exception as e:  # noqa: BLE001 - every bad image is recorded, never raised
                    error = f"{type(e).__name__}: {e}"
            status = "success" if error is None else "failed_to_decode"
            yield {
                "key": f"{dataset}-{stem}-{index:06d}",
                "dataset": dataset,
                "url": f"file://{archive}#{name}",
                "caption": captions.get(_member_key(name, match)),
                "width": width,
                "height": height,
                "original_width": width,
                "original_height": height,
                "status": status,
                "error_message": error,
                "reason": None if error is None else ("empty_file" if not data else classify(status, error)),
                "sha256": hashlib.sha256(data).hexdigest(),
                "extra": json.dumps({"archive": os.path.basename(archive), "member": name}),
                "image": image if error is None else None,
            }
            index += 1


def _ingest_archive(batch: dict, *, stage_dir: str, dataset: str, manifest_path: str, rows_per_part: int,
                    max_pixels: int) -> dict:
    """Ray Data task: one archive to `shards/<archive>.parquet`, written in row groups and renamed into place whole."""
    ds = load_dataset_manifest(manifest_path)
    assert isinstance(ds, ArchiveSource)
    archive, stem = str(batch["archive"][0]), str(batch["stem"][0])
    counts: Counter = Counter()
    rel = f"{SHARDS}/{stem}.parquet"
    seen = _receipt(archive)  # before reading: an archive replaced meanwhile is ingested again next run
    with atomic_path(Path(stage_dir) / rel) as tmp:
        _write_archive_rows(tmp, archive, stem, dataset, ds, counts, rows_per_part, max_pixels)
        record_entry(Path(stage_dir), tmp, rel)
    atomic_write_json(Path(stage_dir) / RECEIPTS / f"{stem}.json", seen)
    return {"archive": [archive], "counts": [json.dumps(dict(counts))]}


def _write_archive_rows(tmp: Path, archive: str, stem: str, dataset: str, ds: ArchiveSource, counts: Counter,
                        rows_per_part: int, max_pixels: int) -> None:
    from pipelines.resumable_parquet import to_arrow

    rows: list[dict] = []
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for row in _archive_rows(archive, stem, dataset, ds, load_captions(ds), max_pixels):
            counts[row["status"] if row["reason"] is None else f"{row['status']}:{row['reason']}"] += 1
            rows.append(row)
            if len(rows) >= rows_per_part:
                writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA), IMAGE_ROW_GROUP)
                rows.clear()
        if rows:
            writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA), IMAGE_ROW_GROUP)


def ingest_archives(ctx, dataset: str, rows_per_part: int, max_pixels: int) -> dict:
    import ray.data

    from pipelines.resumable_parquet import safe_name

    ds = load_dataset_manifest(ctx.dataset_files[dataset])

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
    todo = [it for it in items if not (ctx.stage_dir / SHARDS / f"{it['stem']}.parquet").exists()
            or read_json(ctx.stage_dir / RECEIPTS / f"{it['stem']}.json") != _receipt(it["archive"])]
    ctx.log.info("%s: %d archives, %d to ingest (new, changed or not done)", ctx.name, len(items), len(todo))
    if todo:
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        out = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _ingest_archive,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=ctx.resources.concurrency),
            num_cpus=ctx.resources.cpus,
            fn_kwargs={"stage_dir": str(ctx.stage_dir), "dataset": dataset,
                       "manifest_path": str(ctx.dataset_files[dataset]), "rows_per_part": rows_per_part,
                       "max_pixels": max_pixels},
        )
        out.set_name(ctx.name)
        for _ in out.iter_batches(batch_size=None):
            pass
    return {"archives": len(items), "archives_ingested_this_run": len(todo), "archives_missing": len(missing),
            "archives_missing_names": missing[:20]}


