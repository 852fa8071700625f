"""Local archives (SA-1B, JourneyDB): one Ray Data task per archive commits `shards/<archive>.parquet` whole.

Images are put upright (EXIF orientation) and refused from their header above `max_decode_pixels`.
Each archive gets a receipt (`_archives/<stem>.json`: its size and mtime): a re-downloaded archive is
ingested again. Bad input becomes rows, never a failed stage: a truncated or unreadable archive ends
with a failed row saying so, a member name that is not UTF-8 is kept with replacement characters, and a
malformed line of a JSONL caption file (deep nesting and huge numbers included) is skipped and counted.

No member is read whole on its header's word: a sparse member (a few bytes on disk that expand to any
size; a 10 KB tar held 6 GiB) and one larger than `max_member_bytes` become failed rows unread, every
read is capped, and an extended header (pax, GNU long name) tarfile would read whole is refused above
`MAX_HEADER_BYTES`. A webdataset caption archive has only its caption members read.
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
from typing import Iterator

import pyarrow.parquet as pq

from pipelines.download.images import upright
from pipelines.download.schema import IMAGE_ROW_GROUP, SCHEMA, SHARDS, classify, shard_keys
from pipelines.reservations import dataset_name, drop_dead_reservations
from simplear.datasets import ArchiveSource, load_dataset_manifest
from simplear.observability.logs import ray_data_progress
from simplear.storage import Store, join, open_store
from simplear.workflow.manifest import commit_json, committed, record_entry

log = logging.getLogger("simplear.stage.download")

RECEIPTS = "_archives"
MAX_HEADER_BYTES = 1 << 20  # real pax / long-name headers hold a few hundred bytes
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)

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


class HeaderTooLarge(Exception):
    """An extended header over `MAX_HEADER_BYTES`. Not a TarError: tarfile would turn that into "not a tar file"."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing an extended header before tarfile reads it whole into memory
    (`_proc_member` is the entry point tarfile's own source names for subclasses to override)."""

    def _proc_member(self, tar):
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise HeaderTooLarge(f"an extended header of {self.size} bytes (more than {MAX_HEADER_BYTES})")
        return super()._proc_member(tar)


def open_archive(path: str) -> tarfile.TarFile:
    return tarfile.open(path, "r:*", tarinfo=_BoundedTarInfo)


class ArchiveEnded(Exception):
    """Reading the next member header failed: whatever the archive's bytes made tarfile raise is its `cause`."""

    def __init__(self, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members in order; a header tarfile cannot read ends them with ArchiveEnded, so a caller tells
    the archive's end apart from its own errors."""
    it = iter(tar)
    while True:
        try:
            member = next(it, None)
        except Exception as e:  # noqa: BLE001 - whatever the bytes make tarfile raise
            raise ArchiveEnded(e) from e
        if member is None:
            return
        yield member


def member_problem(member: tarfile.TarInfo, max_bytes: int) -> tuple[str, str] | None:
    """(reason, message) for a member not to be read, from its header alone; None for one to read."""
    if member.issparse():
        return "sparse_member", f"a sparse archive member ({member.size} bytes once expanded) is not read"
    if member.size > max_bytes:
        return "too_large", f"archive member of {member.size} bytes > max_member_bytes {max_bytes}"
    return None


def _webdataset_records(path: str, key_field: str, caption_field: str, max_bytes: int) -> list[dict]:
    """One record per stem of a webdataset-layout tar: {key_field: stem, caption_field: caption}. Only the caption
    members (`.txt`, or `.json` for a dotted field) are read; a damaged one costs that caption only, a damaged
    archive the captions after the damage (their images are kept, left to recaption)."""
    wanted = "txt" if caption_field == "txt" else "json"
    by_stem: dict[str, dict] = {}
    skipped = 0
    with open_archive(path) as tar:
        try:
            for member in members(tar):
                stem, _, ext = _utf8(os.path.basename(member.name)).partition(".")
                if not member.isfile() or ext != wanted:
                    continue
                if member_problem(member, max_bytes):
                    skipped += 1
                    continue
                try:
                    data = tar.extractfile(member).read(max_bytes)
                    if wanted == "txt":
                        value = data.decode("utf-8", "replace").strip()
                    else:
                        value = _dig(json.loads(data), caption_field)
                except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError, MemoryError):
                    skipped += 1
                    continue
                if value is not None:
                    by_stem[stem] = {key_field: stem, caption_field: value}
        except ArchiveEnded as e:
            log.warning("%s: caption archive unreadable after %d captions: %s", path, len(by_stem), e)
    if skipped:
        log.warning("%s: %d caption members skipped (damaged, sparse or over max_member_bytes)", path, skipped)
    return list(by_stem.values())


def load_captions(ds: ArchiveSource, max_bytes: int) -> dict[str, str]:
    """The side file of captions as {member key: caption}, read once per worker process. A record that cannot be
    read (a malformed or hostile line: deep nesting, a huge number) costs that record only."""
    if ds.captions is None:
        return {}
    spec = ds.captions
    path = ds.resolve(spec.path)
    if path in _CAPTIONS:
        return _CAPTIONS[path]
    records: list[dict]
    bad = 0
    if spec.format == "jsonl":
        records = []
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line.decode("utf-8")))
                except (ValueError, RecursionError, MemoryError):  # JSON and UTF-8 errors are ValueErrors
                    bad += 1
    elif spec.format == "json":
        loaded = json.loads(Path(path).read_text())
        records = loaded if isinstance(loaded, list) else [{spec.key_field: k, spec.caption_field: v} for k, v in loaded.items()]
    elif spec.format == "parquet":
        records = pq.read_table(path).to_pylist()
    elif spec.format == "webdataset":
        records = _webdataset_records(path, spec.key_field, spec.caption_field, max_bytes)
    else:
        import csv

        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if spec.format == "tsv" else ","))
    out = {}
    for r in records:
        try:
            key, caption = _dig(r, spec.key_field), _dig(r, spec.caption_field)
            if key is not None and caption is not None:
                out[_member_key(str(key), spec.match)] = str(caption)
        except (ValueError, RecursionError, MemoryError):
            bad += 1
    if bad:
        log.warning("%s: %d malformed records skipped", path, bad)
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


def archive_rows(archive: str, stem: str, dataset: str, ds: ArchiveSource, captions: dict[str, str], max_pixels: int,
                  max_bytes: int):
    """One row per image member; whatever the archive's bytes make tarfile raise ends it with a failed row saying so."""
    exts = tuple(e.lower() for e in ds.image_extensions)
    match = ds.captions.match if ds.captions else "basename"
    try:
        tar = open_archive(archive)
    except Exception as e:  # noqa: BLE001 - an archive that cannot be opened is a row
        yield _failed_read(dataset, f"{stem}-archive", archive, _archive_reason(e, "bad_archive"), e)
        return
    index = 0

    def ended(e: Exception) -> dict:
        reason = _archive_reason(e, "truncated_archive")
        return _failed_read(dataset, f"{stem}-{index:06d}-truncated", archive, reason, e)

    with tar:
        try:
            for member in members(tar):
                if not member.isfile() or not member.name.lower().endswith(exts):
                    continue
                problem, data = member_problem(member, max_bytes), b""
                if problem is None:
                    try:
                        data = tar.extractfile(member).read(max_bytes)  # the header said at most this: never more
                    except MemoryError as e:  # this member only
                        problem = ("too_large", f"MemoryError: {e}")
                    except Exception as e:  # noqa: BLE001 - the archive ends here, with a row
                        yield ended(e)
                        return
                name = _utf8(member.name)
                yield _member_row(f"{dataset}-{stem}-{index:06d}", dataset, archive, name,
                                  captions.get(_member_key(name, match)), data, max_pixels, problem)
                index += 1
        except ArchiveEnded as e:  # the archive ends here, with a row
            yield ended(e.cause)


def _archive_reason(error: Exception, default: str) -> str:
    if isinstance(error, (HeaderTooLarge, MemoryError)):
        return "too_large"
    return default if isinstance(error, (tarfile.TarError, OSError, EOFError)) else "bad_archive"


def _member_row(key: str, dataset: str, archive: str, name: str, caption: str | None, data: bytes, max_pixels: int,
                problem: tuple[str, str] | None) -> dict:
    """The row of one image member: decoded and upright, or failed with the reason `problem` gives or decoding finds."""
    from PIL import Image

    width = height = image = None
    if problem:
        status, (reason, error) = "failed_to_read", problem
    else:
        image, error = upright(data, max_pixels)
        if error is None:
            try:
                with Image.open(io.BytesIO(image)) as im:
                    width, height = im.size
            except Exception as e:  # noqa: BLE001 - every bad image is recorded, never raised
                error = f"{type(e).__name__}: {e}"
        status = "success" if error is None else "failed_to_decode"
        reason = None if error is None else ("empty_file" if not data else classify(status, error))
    return {
        "key": key,
        "dataset": dataset,
        "url": f"file://{archive}#{name}",
        "caption": caption,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "status": status,
        "error_message": error,
        "reason": reason,
        "sha256": None if problem else hashlib.sha256(data).hexdigest(),
        "extra": json.dumps({"archive": os.path.basename(archive), "member": name}),
        "image": image if status == "success" else None,
    }


def _ingest_archive(batch: dict, *, stage: str, dataset: str, manifest_path: str, rows_per_part: int,
                    max_pixels: int, max_bytes: int) -> dict:
    """Ray Data task: one archive to `shards/<archive>.parquet` in the stage folder `stage` (a path or URI), written
    in row groups and committed whole, then its receipt."""
    ds = load_dataset_manifest(manifest_path)
    assert isinstance(ds, ArchiveSource)
    store = open_store(stage)
    archive, stem = str(batch["archive"][0]), str(batch["stem"][0])
    counts: Counter = Counter()
    rel = f"{SHARDS}/{stem}.parquet"
    seen = _receipt(archive)  # before reading: an archive replaced meanwhile is ingested again next run
    with committed(store, rel) as tmp:
        _write_archive_rows(tmp, archive, stem, dataset, ds, counts, rows_per_part, max_pixels, max_bytes)
        record_entry(store, "", tmp, rel)
    commit_json(store, join(RECEIPTS, f"{stem}.json"), seen)
    return {"archive": [archive], "counts": [json.dumps(dict(counts))]}


def _write_archive_rows(tmp: Path, archive: str, stem: str, dataset: str, ds: ArchiveSource, counts: Counter,
                        rows_per_part: int, max_pixels: int, max_bytes: int) -> None:
    from pipelines.resumable_parquet import to_arrow

    rows: list[dict] = []
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for row in archive_rows(archive, stem, dataset, ds, load_captions(ds, max_bytes), max_pixels, max_bytes):
            counts[row["status"] if row["reason"] is None else f"{row['status']}:{row['reason']}"] += 1
            rows.append(row)
            if len(rows) >= rows_per_part:
                writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA), IMAGE_ROW_GROUP)
                rows.clear()
        if rows:
            writer.write_table(to_arrow({k: [r.get(k) for r in rows] for k in SCHEMA.names}, SCHEMA), IMAGE_ROW_GROUP)


def archive_stems(archives: list[str], receipts: str | os.PathLike) -> dict[str, str]:
    """Each archive's shard name, given the receipts folder (a path or URI). An archive keeps the name a receipt
    gave one of its file name (matched by name, so a data folder that moved keeps its names), so nothing done is
    ingested again; another takes its name up to the first dot (`000.tgz` -> `000`) unless that is taken (`a.tar`
    beside `a.tgz`), then its whole file name, then that with a hash of its path (one name in two folders). A
    receipt whose archive is gone keeps its name: its shard is kept."""
    from pipelines.resumable_parquet import safe_name

    by_name: dict[str, list[str]] = {}
    for archive in sorted(archives):
        by_name.setdefault(Path(archive).name, []).append(archive)
    store = open_store(receipts)
    found = [item.key for item in store.list() if item.key.endswith(".json") and "/" not in item.key]
    stems: dict[str, str] = {}
    for key in found:
        name = Path((store.read_json(key) or {}).get("archive") or "").name
        unclaimed = [a for a in by_name.get(name, []) if a not in stems]
        if unclaimed:
            stems[unclaimed[0]] = key.removesuffix(".json")
    taken = {key.removesuffix(".json") for key in found}
    for archive in sorted(a for a in archives if a not in stems):
        name = Path(archive).name
        candidates = (name.split(".")[0], name, f"{name}-{hashlib.sha256(archive.encode()).hexdigest()[:8]}")
        stems[archive] = next(stem for stem in map(safe_name, candidates) if stem not in taken)
        taken.add(stems[archive])
    return stems


def ingest_archives(ctx, stage: Store, dataset: str, rows_per_part: int, max_pixels: int, max_bytes: int) -> dict:
    """Every archive without its shard or whose receipt no longer matches it; `stage`: the stage folder as a store."""
    import ray.data

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
    stems = archive_stems(archives, stage.child(RECEIPTS))
    items = [{"archive": a, "stem": stems[a]} for a in archives]
    done = set(shard_keys(stage))
    todo = [it for it in items if f"{SHARDS}/{it['stem']}.parquet" not in done
            or stage.read_json(join(RECEIPTS, f"{it['stem']}.json")) != _receipt(it["archive"])]
    ctx.log.info("%s: %d archives, %d to ingest (new, changed or not done)", ctx.name, len(items), len(todo))
    if todo:
        ray_data_progress(ctx.interactive)
        out = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _ingest_archive,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=ctx.resources.concurrency),
            num_cpus=ctx.resources.cpus,
            fn_kwargs={"stage": stage.uri, "dataset": dataset,
                       "manifest_path": str(ctx.dataset_files[dataset]), "rows_per_part": rows_per_part,
                       "max_pixels": max_pixels, "max_bytes": max_bytes},
        )
        out.set_name(dataset_name(ctx.name))
        drop_dead_reservations()
        for _ in out.iter_batches(batch_size=None):
            pass
    return {"archives": len(items), "archives_ingested_this_run": len(todo), "archives_missing": len(missing),
            "archives_missing_names": missing[:20]}


