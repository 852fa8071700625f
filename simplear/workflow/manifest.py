"""Stage state on disk: `_MANIFEST.json` (done), `_STARTED.json` (which fingerprint the shards belong to), `_FAILED.json`.

Every commit (`atomic_path`) first checks the run still holds its run dir's lock (lock.check_fence).

The manifest is written last and atomically, so its presence is the one proof a stage finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "_MANIFEST.json"
STARTED = "_STARTED.json"
FAILED = "_FAILED.json"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds.

    Works for files and folders (a checkpoint folder appears whole or not at all).
    """
    from simplear.workflow.lock import check_fence, check_inside_run  # (lock.py reads its file with read_json below)

    path = Path(path)
    check_inside_run(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        yield tmp
        check_fence()  # a task of a run that lost its run dir's lock commits nothing
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(path: Path, tries: int = 4) -> dict | None:
    """The JSON object in `path`, None when missing or damaged. On NFS a file replaced by rename can answer ESTALE
    to a reader holding the old handle: looked up again, a few times, before that is an error."""
    for attempt in range(tries):
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == tries - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # not a readable parquet file: record it without a row count
        return None


def is_bookkeeping(rel: Path) -> bool:
    """Engine files and temporaries (names starting with `_` or `.`) are not stage outputs."""
    return any(part.startswith(("_", ".")) for part in rel.parts)


def file_entry(path: Path, rel: str) -> dict[str, Any]:
    """A manifest's entry for one output file; the task that writes a file computes it (a receipt keeps it)."""
    entry: dict[str, Any] = {"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if rel.endswith(".parquet"):  # by its final name: a task computes this on its temporary file
        entry["rows"] = parquet_rows(path)
    return entry


ENTRIES = "_entries"  # <stage>/_entries/<rel>.json: entries recorded by the tasks that wrote the files


def record_entry(stage_dir: Path, tmp: Path, rel: str) -> dict[str, Any]:
    """In a writing task, before its file is renamed into place: compute and keep the file's manifest entry."""
    entry = file_entry(tmp, rel)
    atomic_write_json(Path(stage_dir) / ENTRIES / f"{rel}.json", entry)
    return entry


def recorded_entries(stage_dir: Path) -> dict[str, dict]:
    root = Path(stage_dir) / ENTRIES
    entries = (read_json(f) for f in sorted(root.rglob("*.json"))) if root.is_dir() else ()
    return {e["path"]: e for e in entries if e}


def describe_outputs(stage_dir: Path, only: list[str] | None = None, known: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Every output file (or those under the given relative paths) with its size, checksum and Parquet row count.

    `known`: entries the writing tasks computed (by relative path); a file is re-read only when it has
    none or its size no longer matches, so a stage of thousands of parts is not hashed serially at the end.
    """
    roots = [stage_dir / p for p in only] if only is not None else [stage_dir]
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += [p for p in root.rglob("*") if p.is_file()]
        else:
            raise FileNotFoundError(f"stage output {root} does not exist")
    known = known or {}
    outputs = []
    for f in sorted(set(files)):
        rel = f.relative_to(stage_dir)
        if only is None and is_bookkeeping(rel):
            continue
        entry = known.get(str(rel))
        if entry is None or entry.get("bytes") != f.stat().st_size:
            entry = file_entry(f, str(rel))
        outputs.append(entry)
    return outputs
