"""Stage state on disk: `_MANIFEST.json` (done), `_STARTED.json` (which fingerprint the shards belong to), `_FAILED.json`.

The manifest is written last and atomically, so its presence is the one proof a stage finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        yield tmp
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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
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


def describe_outputs(stage_dir: Path, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every output file (or those under the given relative paths) with its size, checksum and Parquet row count."""
    roots = [stage_dir / p for p in only] if only is not None else [stage_dir]
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += [p for p in root.rglob("*") if p.is_file()]
        else:
            raise FileNotFoundError(f"stage output {root} does not exist")
    outputs = []
    for f in sorted(set(files)):
        rel = f.relative_to(stage_dir)
        if only is None and is_bookkeeping(rel):
            continue
        entry: dict[str, Any] = {"path": str(rel), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
        if f.suffix == ".parquet":
            entry["rows"] = parquet_rows(f)
        outputs.append(entry)
    return outputs


def fingerprint(kind: str, config: dict, code_version: str, inputs: dict[str, dict], datasets: dict[str, str]) -> str:
    """Hash of what determines a stage's outputs: its resolved config, its inputs' manifests, its code, its datasets."""
    payload = {
        "kind": kind,
        "config": config,
        "code_version": code_version,
        "inputs": {
            name: {"fingerprint": m["fingerprint"], "outputs": [(o["path"], o["sha256"]) for o in m["outputs"]]}
            for name, m in sorted(inputs.items())
        },
        "datasets": datasets,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
