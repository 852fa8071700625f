"""What a run keeps its state on: whole objects under keys relative to the run dir, with the two conditional
writes a lock and a commit point need (create-only, compare-and-swap on a version).

Every backend answers the same questions, so the engine, the lock and the manifests are written once: a local
or shared POSIX folder (local.py) and S3 (s3.py). A version is an opaque string: what the backend gives back for
exactly those bytes (a content hash on POSIX, the ETag on S3).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class Blob:
    data: bytes
    version: str


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    tag: str = field(default="", compare=False)  # changes when the bytes do: the ETag on S3, size and mtime on POSIX


class StoreError(RuntimeError):
    """The storage answered something a run cannot go on with (credentials, a missing bucket, a refused write)."""


class Store(ABC):
    """A run dir. Keys are `/`-separated and relative to it (`pretrain/_MANIFEST.json`)."""

    uri: str  # what the user wrote, normalised: an absolute path or `s3://bucket/prefix`

    @property
    def is_local(self) -> bool:
        """A POSIX folder (this node's disk or a shared mount): stages may write into it with plain file calls."""
        return False

    @property
    def local_root(self) -> Path:
        raise StoreError(f"{self.uri} is not a folder on this node")

    @abstractmethod
    def read(self, key: str) -> Blob | None:
        """The object and its version; None when there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> str:
        """Replace the object whole (readers see the old or the new bytes, never a mix); returns its version."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str | None:
        """Write only if there is no object under `key`: its version, or None when one was there."""

    @abstractmethod
    def swap(self, key: str, data: bytes, version: str) -> str | None:
        """Replace the object only if it still has `version`: the new version, or None when it changed or is gone."""

    @abstractmethod
    def delete(self, key: str, version: str | None = None) -> bool:
        """Remove the object (only at `version` when given); whether it was removed by this call."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[Listed]:
        """Every object under `prefix` (a folder's worth: `a/` lists `a/x` and `a/b/y`), in key order."""

    @abstractmethod
    def upload(self, local: Path, key: str) -> None:
        """Put a local file under `key` (whole: a reader sees all of it or the object before)."""

    @abstractmethod
    def download(self, key: str, local: Path) -> None:
        """Copy the object to a local file (FileNotFoundError when there is none)."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Move one object or every object under a folder key to another key. A rename on POSIX; on object
        storage a server-side copy then a delete per object (not atomic: used only for what no manifest names)."""

    @abstractmethod
    def check(self) -> None:
        """Before a run holds the run dir: raise when this storage cannot hold a run (clearly, naming it)."""

    @abstractmethod
    def describe(self) -> str:
        """Where this is, for messages: the mount and file system type, or the endpoint and bucket."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether there is an object under `key` (without reading it)."""

    @abstractmethod
    def filesystem(self):
        """(pyarrow filesystem or None for the local one, the run dir as a path on it): what Ray Data, pyarrow and
        Ray Train are handed, so the data plane reads and writes the same run dir as the engine."""

    def read_json(self, key: str) -> dict | None:
        """The JSON object under `key`; None when missing or damaged (a half-written file of an older release)."""
        blob = self.read(key)
        if blob is None:
            return None
        try:
            data = json.loads(blob.data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, key: str, data: Any) -> str:
        return self.write(key, dump_json(data))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a folder key; how many bytes that freed."""
        freed = 0
        for item in list(self.list(prefix)):
            self.delete(item.key)
            freed += item.size
        return freed

    def child(self, key: str) -> str:
        """The URI of a key, for messages and for tools that take one (Ray Data, Ray Train)."""
        return f"{self.uri.rstrip('/')}/{key}"


def dump_json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def join(*parts: str) -> str:
    """A key from parts, without empty parts or doubled slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
