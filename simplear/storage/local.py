"""A run dir that is a POSIX folder: this node's disk, or a shared mount (NFS, CephFS, Lustre) every node sees.

Whole-object writes are temp file + rename. Create-only is a hard link of a finished temp file (atomic on NFS
too; a retransmitted link() that succeeded answers EEXIST, so the temp file's link count decides, as open(2)
describes). Compare-and-swap holds an flock on a side file while it compares and renames: every writer of a
key that swaps goes through it. A version is the content's hash, so it needs no clock and no inode.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from simplear.storage.base import Blob, Listed, Store, StoreError
from simplear.storage.mounts import RUN_DIR_STORAGE, UnsupportedRunDir, check_storage, describe_storage


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def read_bytes(path: Path, tries: int = 4) -> bytes | None:
    """The file's bytes, None when missing. On NFS a file replaced by rename can answer ESTALE to a reader
    holding the old handle: looked up again, a few times, before that is an error."""
    for attempt in range(tries):
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == tries - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    return None


def listed(path: Path, key: str) -> Listed:
    st = path.stat()
    return Listed(key, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = str(self.root)

    @property
    def is_local(self) -> bool:
        return True

    @property
    def local_root(self) -> Path:
        return self.root

    def path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def check(self) -> None:
        """Refuse a FUSE mount of object storage before any work (no hard links, folder renames not atomic)."""
        self.root.mkdir(parents=True, exist_ok=True)
        check_storage(self.root)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def filesystem(self):
        return None, str(self.root)

    def read(self, key: str) -> Blob | None:
        data = read_bytes(self.path(key))
        return None if data is None else Blob(data, version_of(data))

    def _temp(self, path: Path, tag: str) -> Path:
        return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{os.urandom(4).hex()}")

    def write(self, key: str, data: bytes) -> str:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(path, "tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return version_of(data)

    def create(self, key: str, data: bytes) -> str | None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(path, "new")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return version_of(data)
        except FileExistsError:
            return version_of(data) if os.stat(tmp).st_nlink == 2 else None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            raise UnsupportedRunDir(f"{self.root}: {describe_storage(self.root)} makes no hard links ({e.strerror}), "
                                    f"which the run lock needs: {RUN_DIR_STORAGE}") from None
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _serialised(self, path: Path) -> Iterator[None]:
        """One compare-then-write at a time per key, across processes and (over NFSv4) hosts."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.cas"), "a") as side:
            fcntl.flock(side, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(side, fcntl.LOCK_UN)

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        path = self.path(key)
        with self._serialised(path):
            current = self.read(key)
            if current is None or current.version != version:
                return None
            return self.write(key, data)

    def delete(self, key: str, version: str | None = None) -> bool:
        path = self.path(key)
        if version is None:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False
        with self._serialised(path):
            current = self.read(key)
            if current is None or current.version != version:
                return False
            path.unlink(missing_ok=True)
            path.with_name(f".{path.name}.cas").unlink(missing_ok=True)
            return True

    def list(self, prefix: str = "") -> Iterator[Listed]:
        base = self.path(prefix)
        if base.is_file():
            yield listed(base, prefix)
            return
        if not base.is_dir():
            return
        for f in sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink()):
            yield listed(f, str(f.relative_to(self.root)))

    def upload(self, local: Path, key: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(path, "tmp")
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, key: str, local: Path) -> None:
        shutil.copyfile(self.path(key), local)

    def move(self, src: str, dst: str) -> None:
        target = self.path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise StoreError(f"cannot move {src} to {dst}: {target} exists")
        os.rename(self.path(src), target)

    def delete_prefix(self, prefix: str) -> int:
        base = self.path(prefix)
        freed = sum(item.size for item in self.list(prefix))
        if base.is_dir() and not base.is_symlink():
            shutil.rmtree(base)
        elif base.exists() or base.is_symlink():
            base.unlink()
        return freed

    def describe(self) -> str:
        return describe_storage(self.root)
