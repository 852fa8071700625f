"""Where a run dir lives: a POSIX folder (local disk, a shared mount) or object storage (`s3://`), behind one
interface (base.Store) that the engine, the lock, the manifests and the stages' commits use."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from simplear.storage.base import Blob, Listed, Store, StoreError, dump_json, join

__all__ = ["Blob", "Listed", "Store", "StoreError", "dump_json", "is_uri", "join", "open_parent", "open_store", "SCHEMES"]

SCHEMES = {"s3": "tested against a real S3 server (moto) with conditional writes"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(value: str) -> bool:
    return bool(_URI.match(value))


def check_uri(value: str) -> str:
    """A run dir URI of a supported scheme; any other scheme is refused (never turned into a local folder)."""
    scheme = _URI.match(value).group(1).lower()
    if scheme not in SCHEMES:
        raise ValueError(f"run_dir {value!r}: {scheme}:// is not a supported run dir (supported: "
                         f"{', '.join(s + '://' for s in SCHEMES)}, or a path on a file system every node mounts). "
                         "gs:// and abfs:// need a client with conditional writes, which this release does not have yet")
    if scheme == "s3":
        from simplear.storage.s3 import parse_s3

        try:
            parse_s3(value)
        except ValueError as e:
            raise ValueError(f"run_dir {e}") from None
    return value


def open_store(run_dir: str | Path) -> Store:
    """The store of a run dir: a URI of a supported scheme, else an absolute path."""
    text = str(run_dir)
    if is_uri(text):
        check_uri(text)
        return _s3_store(text, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    from simplear.storage.local import LocalStore

    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"run dir {text!r}: resolve it against workflow.yaml's folder first")
    return LocalStore(path)


def open_parent(location: str | Path) -> tuple[Store, str]:
    """(store of the folder holding `location`, its name): what a function handed one location (a stage folder, a
    checkpoint folder; a path or a URI) writes through."""
    parent, name = str(location).rstrip("/").rsplit("/", 1)
    return open_store(parent), name


@lru_cache(maxsize=32)
def _s3_store(uri: str, endpoint: str | None) -> Store:
    """One client per run dir and endpoint in a process: every commit checks the lock through it."""
    from simplear.storage.s3 import S3Store

    return S3Store(uri)
