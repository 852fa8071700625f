"""One run per run dir: `<run_dir>/_LOCK.json`, a heartbeat, takeover of dead holders, and a fencing token.

The lock names its holder (host, pid, Ray job, embedded Ray session, run id) and is refreshed by a
heartbeat. A second run refuses while the holder lives; a holder whose pid is gone (same host) or
whose heartbeat stopped (`stale_after_s`, for a holder on another host of shared storage) is taken
over, and what its embedded Ray left running is ended, only where the lock proves it is that Ray
(ray_session.py: anyone who can write the run dir can write the lock). Every commit a stage makes checks the lock
still holds its run id (`check_fence`, called by `atomic_path`), so a task of a run that lost its
lock stops writing instead of mixing its shards into the new run's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field

from simplear.config import StrictModel
from simplear.workflow.manifest import read_json
from simplear.workflow.storage import RUN_DIR_STORAGE, UnsupportedRunDir, check_storage, describe_storage
from simplear.workflow.ray_session import end_dead_session

log = logging.getLogger("simplear.lock")

LOCK = "_LOCK.json"
FENCE_ENV = "SIMPLEAR_FENCE"  # {"lock": path, "run_id": id}: set for the driver and every task of a run


class LockSettings(StrictModel):
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between heartbeats of the holder")
    stale_after_s: float = Field(120.0, gt=0, description="a holder on another host with no heartbeat this long is dead")


class RunLocked(RuntimeError):
    """Another live run holds the run dir."""


class FencedOut(RuntimeError):
    """This run no longer holds the lock of its run dir: its writes must stop."""


class OutsideRun(ValueError):
    """A write of a run would land outside its run dir (a name from a config or a data file made a path)."""


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def holder_alive(holder: dict, settings: LockSettings) -> tuple[bool, str]:
    """(alive, why) for the run a lock names."""
    if holder.get("host") == socket.gethostname():
        started = _process_start(int(holder.get("pid", -1)))
        if started is None:
            return False, f"its process {holder.get('pid')} is gone"
        if holder.get("pid_started") and abs(started - holder["pid_started"]) > 1.0:
            return False, f"pid {holder.get('pid')} now belongs to another process"
        return True, "its process is running"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > settings.stale_after_s:
        return False, f"no heartbeat for {age:.0f}s (stale_after_s {settings.stale_after_s:g})"
    return True, f"heartbeat {age:.0f}s ago"


def describe_holder(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    job = f", Ray job {holder['job_id']}" if holder.get("job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return (f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}{job}, started {started}, "
            f"last heartbeat {age:.0f}s ago)")


class RunLock:
    """The lock of one run dir, held by this process from `acquire` until `release`."""

    def __init__(self, path: Path, info: dict, settings: LockSettings):
        self.path, self.info, self.settings = path, info, settings
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @property
    def fence_token(self) -> str:
        return json.dumps({"lock": str(self.path), "run_id": self.run_id})

    @classmethod
    def acquire(cls, run_dir: Path, settings: LockSettings, purpose: str = "run") -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        check_storage(run_dir)
        path = run_dir / LOCK
        pid = os.getpid()
        info = {
            "run_id": uuid.uuid4().hex,
            "purpose": purpose,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_start(pid),
            "job_id": _submission_id(),
            "ray_session": None,  # ray_session.claim_session, once the embedded Ray runs
            "running": [],
            "started_at": time.time(),
            "heartbeat": time.time(),
        }
        for _ in range(20):
            if _create_exclusive(path, info):
                lock = cls(path, info, settings)
                lock._start_heartbeat()
                return lock
            holder = read_json(path)
            if holder is None:  # being written or damaged: look again, then judge it by its age
                time.sleep(0.2)
                holder = read_json(path)
                if holder is None:
                    holder = {"run_id": "unreadable", "heartbeat": path.stat().st_mtime if path.exists() else 0}
            alive, why = holder_alive(holder, settings)
            if alive:
                raise RunLocked(f"{run_dir} is in use by {describe_holder(holder)}: wait for it to end or stop it "
                                f"(`simplear jobs stop` for a job, or end pid {holder.get('pid')}); one run per run dir")
            buried = path.with_name(f".{LOCK}.dead-{holder.get('run_id')}-{uuid.uuid4().hex[:6]}")
            try:
                os.rename(path, buried)  # only one taker wins this rename
            except FileNotFoundError:
                continue
            log.warning("taking over the lock of %s from %s: %s", run_dir, describe_holder(holder), why)
            end_dead_session(holder)
            buried.unlink(missing_ok=True)
        raise RunLocked(f"{run_dir}: could not take the lock {path} (other runs keep taking it)")

    def _write(self) -> None:
        tmp = self.path.with_name(f".{LOCK}.{self.run_id}.tmp")
        tmp.write_text(json.dumps(self.info, indent=2))
        os.replace(tmp, self.path)

    def holds(self) -> bool:
        current = read_json(self.path)
        return current is not None and current.get("run_id") == self.run_id

    def update(self, **fields: Any) -> None:
        with self._mutex:
            if not self.holds():
                raise FencedOut(f"{self.path}: this run ({self.run_id}) lost the lock to {describe_holder(read_json(self.path) or {})}")
            self.info.update(fields, heartbeat=time.time())
            self._write()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.settings.heartbeat_s):
                try:
                    self.update()
                except FencedOut as e:
                    log.error("%s", e)
                    return
                except OSError as e:  # shared storage hiccup: try again at the next beat
                    log.warning("lock heartbeat failed: %s", e)

        self._thread = threading.Thread(target=beat, name="simplear-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._mutex:
            if self.holds():
                self.path.unlink(missing_ok=True)


def _submission_id() -> str | None:
    """The Ray job this driver runs as, from the job config the job supervisor hands its entrypoint."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
    except (json.JSONDecodeError, AttributeError):
        return None


def _create_exclusive(path: Path, info: dict) -> bool:
    """Create the lock whole or not at all: written aside, then hard-linked into place (fails if it exists)."""
    tmp = path.with_name(f".{LOCK}.{info['run_id']}.new")
    tmp.write_text(json.dumps(info, indent=2))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:  # NFS answers a retransmitted link() that succeeded with EEXIST: the link count tells
        return os.stat(tmp).st_nlink == 2
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        raise UnsupportedRunDir(f"{path.parent}: {describe_storage(path.parent)} makes no hard links ({e.strerror}), which "
                                f"the run lock needs: {RUN_DIR_STORAGE}") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_lock(run_dir: Path, settings: LockSettings) -> tuple[dict | None, bool]:
    """(the lock's holder or None, whether that holder is alive), for `status` and `--dry-run`."""
    holder = read_json(run_dir / LOCK)
    if holder is None:
        return None, False
    return holder, holder_alive(holder, settings)[0]


def task_env(**env_vars: str) -> dict:
    """A runtime_env for tasks that set env vars of their own, still carrying this run's fencing token."""
    token = os.environ.get(FENCE_ENV)
    return {"env_vars": {**({FENCE_ENV: token} if token else {}), **env_vars}}


def check_fence() -> None:
    """Raise FencedOut when this process works for a run that no longer holds its run dir's lock."""
    token = os.environ.get(FENCE_ENV)
    if not token:
        return
    fence = json.loads(token)
    problem = fence_problem(Path(fence["lock"]), fence["run_id"])
    if problem:
        raise FencedOut(f"{problem}: not writing")


def fence_problem(lock: Path, run_id: str) -> str | None:
    """Why a process on this node may not write for run `run_id` of `lock` (None: it may): the run dir is not
    there, or the lock is another run's. Read by every commit, and by the cluster preflight on each node."""
    holder = read_json(lock)
    if holder is None and not lock.parent.exists():
        return (f"the run dir {lock.parent} is not visible on this node ({socket.gethostname()}): it does not exist "
                "on this node; a run on a cluster needs a run dir every node mounts at the same path")
    if holder is None or holder.get("run_id") != run_id:
        who = describe_holder(holder) if holder else "nobody"
        return f"run {run_id} lost the lock {lock} (now held by {who})"
    return None


def check_inside_run(path: str | os.PathLike) -> None:
    """Raise OutsideRun when this process works for a run and `path` (symlinks followed) is not under its run dir:
    names from workflow files and data files become paths, and a `../` or a planted symlink must not carry a
    write elsewhere."""
    token = os.environ.get(FENCE_ENV)
    if not token:
        return
    run_dir = Path(json.loads(token)["lock"]).parent.resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(run_dir):
        raise OutsideRun(f"refusing to write {path}: it resolves to {target}, outside the run dir {run_dir}")
