"""Stage state in the run dir: `_MANIFEST.json` (done), `_STARTED.json` (which fingerprint the shards belong to),
`_FAILED.json`; and how outputs are committed, on any storage (simplear.storage).

Every commit first checks the run still holds its run dir's lock (lock.check_fence). An output appears whole or
not at all: on a POSIX run dir by temp name + rename, on object storage as one PUT per file (a folder's files one
by one: readers trust only what a manifest lists). The manifest is written last, so its presence is the one proof
a stage finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from simplear.storage import Store, dump_json, join
from simplear.storage.local import read_bytes
from simplear.storage.staging import staging_dir

MANIFEST = "_MANIFEST.json"
STARTED = "_STARTED.json"
FAILED = "_FAILED.json"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds.

    Works for files and folders (a checkpoint folder appears whole or not at all).
    """
    from simplear.workflow.lock import check_fence, check_inside_run  # (lock.py reads manifests' helpers)

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
        remove(tmp)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def committed(store: Store, key: str) -> Iterator[Path]:
    """`with committed(store, "pretrain/final") as tmp:` write a file or a folder at tmp; on success it appears
    under `key` (a folder's stale files removed), checked against the run's fence first."""
    if store.is_local:
        with atomic_path(store.local_root / key) as tmp:
            yield tmp
        return
    from simplear.workflow.lock import check_fence

    scratch = Path(tempfile.mkdtemp(prefix="commit-", dir=staging_dir()))
    tmp = scratch / Path(key).name
    try:
        yield tmp
        check_fence()
        if tmp.is_dir():
            files = {str(f.relative_to(tmp)): f for f in sorted(tmp.rglob("*")) if f.is_file()}
            before = [item.key for item in store.list(key)]
            for rel, f in files.items():
                store.upload(f, join(key, rel))
            for old in before:
                if old[len(key) + 1:] not in files:
                    store.delete(old)
        elif tmp.exists():
            store.upload(tmp, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(dump_json(data))


def commit_json(store: Store, key: str, data: Any) -> None:
    """A bookkeeping object (manifest, receipt, failure), written whole after the fence check."""
    if store.is_local:
        atomic_write_json(store.local_root / key, data)
        return
    from simplear.workflow.lock import check_fence

    check_fence()
    store.write_json(key, data)


def read_json(path: Path) -> dict | None:
    """The JSON object in a local file, None when missing or damaged (ESTALE on NFS is looked up again)."""
    data = read_bytes(Path(path))
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


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


def record_entry(store: Store, stage: str, tmp: Path, rel: str) -> dict[str, Any]:
    """In a writing task, before its file is committed: compute and keep the file's manifest entry."""
    entry = file_entry(tmp, rel)
    commit_json(store, join(stage, ENTRIES, f"{rel}.json"), entry)
    return entry


def recorded_entries(store: Store, stage: str) -> dict[str, dict]:
    entries = (store.read_json(item.key) for item in store.list(join(stage, ENTRIES)) if item.key.endswith(".json"))
    return {e["path"]: e for e in entries if e}


def remote_entry(store: Store, key: str, rel: str) -> dict[str, Any]:
    """The entry of a file on object storage that no writing task recorded: fetched once to hash it."""
    scratch = Path(tempfile.mkdtemp(prefix="hash-", dir=staging_dir()))
    try:
        local = scratch / Path(rel).name
        store.download(key, local)
        return file_entry(local, rel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def describe_outputs(store: Store, stage: str, only: list[str] | None = None,
                     known: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Every output file of a stage (or those under the given relative paths) with its size, checksum and Parquet
    row count.

    `known`: entries the writing tasks computed (by relative path); a file is re-read only when it has
    none or its size no longer matches, so a stage of thousands of parts is not hashed serially at the end.
    """
    found: dict[str, int] = {}
    for root in ([join(stage, p) for p in only] if only is not None else [stage]):
        listed = {item.key: item.size for item in store.list(root)}
        if not listed and only is not None and not (store.is_local and (store.local_root / root).exists()):
            raise FileNotFoundError(f"stage output {store.child(root)} does not exist")
        found.update(listed)
    known = known or {}
    outputs = []
    for key in sorted(found, key=PurePosixPath):  # path order, as manifests of earlier releases list their outputs
        rel = key[len(stage) + 1:]
        if only is None and is_bookkeeping(Path(rel)):
            continue
        entry = known.get(rel)
        if entry is None or entry.get("bytes") != found[key]:
            entry = file_entry(store.local_root / key, rel) if store.is_local else remote_entry(store, key, rel)
        outputs.append(entry)
    return outputs
