"""Node-local scratch space for a run on object storage: what is written before it is uploaded (outputs,
checkpoints), and folders fetched to be read by libraries that only open local files (a checkpoint to load)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

STAGING_ENV = "SIMPLEAR_STAGING_DIR"


def staging_dir() -> Path:
    """`SIMPLEAR_STAGING_DIR` (set it to a node's large local disk), else the Ray session's folder on this node (Ray's
    temp dir, removed with the session), else the system's temp folder (no Ray in this process)."""
    configured = os.environ.get(STAGING_ENV)
    if configured:
        root = Path(configured)
    else:
        try:
            import ray

            root = Path(ray._private.worker._global_node.get_session_dir_path()) / "simplear-staging"
        except AttributeError:  # no Ray in this process
            root = Path(tempfile.gettempdir()) / "simplear-staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_folder(location: str | os.PathLike) -> Path:
    """A folder to open with local file calls: a path as it is; `<run dir URI>/<key>` (e.g. an input stage's
    final checkpoint on S3) fetched once per node into the staging dir, and reused while the objects there are
    the same ones (a stage that trained again under the same key is fetched again: its listing differs)."""
    from simplear.storage import is_uri

    text = str(location)
    if not is_uri(text):
        return Path(text)
    store, key = split_uri(text)
    items = list(store.list(key))
    if not items:
        raise FileNotFoundError(f"{text}: nothing there")
    listing = "\n".join(f"{i.key} {i.size} {i.tag}" for i in items)
    target = staging_dir() / "fetched" / hashlib.sha256(f"{text}\n{listing}".encode()).hexdigest()[:24]
    done = target / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for item in items:
            dest = tmp / item.key[len(key) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.download(item.key, dest)
        (tmp / ".complete").write_text(text)
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node fetched it first
            if not done.exists():
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_uri(uri: str):
    """(store of the bucket, key within it) for `scheme://bucket/key...`: a location is readable without knowing
    which prefix is the run dir."""
    from simplear.storage import open_store

    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return open_store(f"{scheme}://{bucket}"), key.strip("/")
