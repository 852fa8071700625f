"""The file system under a run dir: which mount holds it, and whether a run can keep its lock and commits there."""

from __future__ import annotations

import os
from pathlib import Path

# FUSE file systems over object storage (their type in /proc/self/mountinfo): no hard links, folder renames not atomic
OBJECT_STORE_FUSE = ("fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.blobfuse2", "fuse.s3fs", "fuse.goofys",
                     "fuse.rclone")
RUN_DIR_STORAGE = ("a run dir must be on a local disk (one machine) or a POSIX shared file system every node "
                   "mounts at the same path (NFS, CephFS, Lustre, JuiceFS ...)")


class UnsupportedRunDir(RuntimeError):
    """The run dir's storage lacks what a run needs: hard links, atomic renames, or a path every node sees."""


def mount_of(path: str | os.PathLike) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path`, from /proc/self/mountinfo; ("?", "?") where
    that cannot be read (not Linux)."""
    target = str(Path(path).resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "?", "?"
    mounts = []
    for line in lines:
        fields = line.split(" ")
        if "-" in fields:  # mount point is field 5; the file system type follows the "-" separator
            mounts.append((fields[4].replace("\\040", " "), fields[fields.index("-") + 1]))
    holding = [m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m[0]), default=("?", "?"))


def describe_storage(folder: Path) -> str:
    point, fstype = mount_of(folder)
    return f"the file system there ({fstype}, mounted on {point})"


def check_storage(run_dir: Path) -> None:
    """Refuse, before any work, a run dir on a FUSE mount of object storage: it has no hard links and renames a
    folder file by file (copy then delete), so neither the lock nor a commit would be atomic there."""
    fstype = mount_of(run_dir)[1]
    if fstype in OBJECT_STORE_FUSE:
        raise UnsupportedRunDir(f"{run_dir}: {describe_storage(run_dir)} is a FUSE mount of object storage: "
                                f"{RUN_DIR_STORAGE}")
