"""One run per run dir: `<run_dir>/_LOCK.json`, a heartbeat, takeover of dead holders, and a fencing token.

The same protocol on every storage (simplear.storage: a POSIX folder or S3), with its conditional writes:
- acquire = create-only;
- heartbeat = compare-and-swap on the version the holder last wrote: a failed swap means the lock was taken,
  and the run stops writing;
- takeover = compare-and-swap on the version the taker read, once the holder is proven dead: its pid is gone
  (same host), or the lock's version stayed unchanged for `stale_after_s` on the taker's own monotonic clock
  (another host: no two machines' clocks are ever compared); what a dead holder's embedded Ray left running is
  ended only where the lock proves it is that Ray (ray_session.py: anyone who can write the run dir can write
  the lock);
- release = delete at the holder's version.
Every commit a stage makes checks the lock still holds its run id (`check_fence`, called by every commit), so a
task of a run that lost its lock stops writing instead of mixing its shards into the new run's.
"""

from __future__ import annotations

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
from simplear.storage import Store, dump_json, open_store
from simplear.workflow.ray_session import end_dead_session

log = logging.getLogger("simplear.lock")

LOCK = "_LOCK.json"
FENCE_ENV = "SIMPLEAR_FENCE"  # {"run": run dir path or URI, "run_id": id}: set for the driver and every task of a run


class LockSettings(StrictModel):
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between heartbeats of the holder")
    stale_after_s: float = Field(120.0, gt=0, description="a holder on another host whose lock has not changed this "
                                 "long (timed by the taker's own clock) is dead")


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


def same_host_verdict(holder: dict) -> tuple[bool, str] | None:
    """(alive, why) for a holder on this host, from its process; None for a holder elsewhere (watch its lock)."""
    if holder.get("host") != socket.gethostname():
        return None
    started = _process_start(int(holder.get("pid", -1)))
    if started is None:
        return False, f"its process {holder.get('pid')} is gone"
    if holder.get("pid_started") and abs(started - holder["pid_started"]) > 1.0:
        return False, f"pid {holder.get('pid')} now belongs to another process"
    return True, "its process is running"


def holder_alive(holder: dict, settings: LockSettings) -> tuple[bool, str]:
    """(alive, why) as far as one look tells, for `status` and `--dry-run`: a holder on another host by its
    heartbeat's age on its host's clock. A run taking the lock never trusts that age (`watch_holder`)."""
    verdict = same_host_verdict(holder)
    if verdict is not None:
        return verdict
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > settings.stale_after_s:
        return False, f"no heartbeat for {age:.0f}s by its host's clock (stale_after_s {settings.stale_after_s:g})"
    return True, f"heartbeat {age:.0f}s ago"


def watch_holder(store: Store, version: str, settings: LockSettings) -> tuple[bool, str]:
    """(alive, why) for a holder on another host: alive as soon as its lock changes (a heartbeat), dead when it
    stays at `version` for `stale_after_s` on this process's monotonic clock."""
    t0 = time.monotonic()
    log.info("the lock of %s is held from another host: watching it for up to %.0fs for a heartbeat",
             store.uri, settings.stale_after_s)
    while time.monotonic() - t0 < settings.stale_after_s:
        time.sleep(min(1.0, settings.stale_after_s / 20))
        blob = store.read(LOCK)
        if blob is None:  # released: the taker's swap fails on the missing lock and it creates its own
            return False, "it released the lock"
        if blob.version != version:
            return True, f"its lock changed {time.monotonic() - t0:.0f}s into watching"
    return False, f"its lock did not change for {settings.stale_after_s:g}s (stale_after_s, timed here)"


def describe_holder(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    job = f", Ray job {holder['job_id']}" if holder.get("job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return (f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}{job}, started {started}, "
            f"last heartbeat {age:.0f}s ago)")


class RunLock:
    """The lock of one run dir, held by this process from `acquire` until `release`."""

    def __init__(self, store: Store, info: dict, version: str, settings: LockSettings):
        self.store, self.info, self.version, self.settings = store, info, version, settings
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @property
    def fence_token(self) -> str:
        return json.dumps({"run": self.store.uri, "run_id": self.run_id})

    @classmethod
    def acquire(cls, run_dir: Store | str | Path, settings: LockSettings, purpose: str = "run") -> "RunLock":
        store = run_dir if isinstance(run_dir, Store) else open_store(run_dir)
        store.check()
        pid = os.getpid()
        info = {
            "run_id": uuid.uuid4().hex,
            "purpose": purpose,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_start(pid),
            "job_id": _submission_id(),
            "heartbeat_s": settings.heartbeat_s,
            "ray_session": None,  # ray_session.claim_session, once the embedded Ray runs
            "running": [],
            "started_at": time.time(),
            "heartbeat": time.time(),
        }
        for _ in range(20):
            version = store.create(LOCK, dump_json(info))
            if version is not None:
                return cls(store, info, version, settings)._start_heartbeat()
            blob = store.read(LOCK)
            if blob is None:  # released meanwhile: try again
                continue
            try:
                holder = json.loads(blob.data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = {"run_id": "unreadable"}
            holder = holder if isinstance(holder, dict) else {"run_id": "unreadable"}
            alive, why = same_host_verdict(holder) or watch_holder(store, blob.version, settings)
            if alive:
                raise RunLocked(f"{store.uri} is in use by {describe_holder(holder)} ({why}): wait for it to end or "
                                f"stop it (`simplear jobs stop` for a job, or end pid {holder.get('pid')}); one run per "
                                "run dir")
            version = store.swap(LOCK, dump_json(info), blob.version)  # only one taker wins this swap
            if version is None:
                continue
            log.warning("taking over the lock of %s from %s: %s", store.uri, describe_holder(holder), why)
            end_dead_session(holder)
            return cls(store, info, version, settings)._start_heartbeat()
        raise RunLocked(f"{store.uri}: could not take the lock (other runs keep taking it)")

    def holds(self) -> bool:
        current = self.store.read_json(LOCK)
        return current is not None and current.get("run_id") == self.run_id

    def update(self, **fields: Any) -> None:
        with self._mutex:
            info = {**self.info, **fields, "heartbeat": time.time()}
            version = self.store.swap(LOCK, dump_json(info), self.version)
            if version is None:
                raise FencedOut(f"{self.store.child(LOCK)}: this run ({self.run_id}) lost the lock to "
                                f"{describe_holder(self.store.read_json(LOCK) or {})}")
            self.info, self.version = info, version

    def _start_heartbeat(self) -> "RunLock":
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
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._mutex:
            self.store.delete(LOCK, version=self.version)  # a lock taken from us is not ours to delete


def _submission_id() -> str | None:
    """The Ray job this driver runs as, from the job config the job supervisor hands its entrypoint."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
    except (json.JSONDecodeError, AttributeError):
        return None


def read_lock(store: Store, settings: LockSettings) -> tuple[dict | None, bool]:
    """(the lock's holder or None, whether that holder looks alive), for `status` and `--dry-run`."""
    holder = store.read_json(LOCK)
    if holder is None:
        return None, False
    return holder, holder_alive(holder, settings)[0]


def task_env(**env_vars: str) -> dict:
    """A runtime_env for tasks that set env vars of their own, still carrying this run's fencing token."""
    token = os.environ.get(FENCE_ENV)
    return {"env_vars": {**({FENCE_ENV: token} if token else {}), **env_vars}}


def _fence() -> dict | None:
    token = os.environ.get(FENCE_ENV)
    return json.loads(token) if token else None


def check_fence() -> None:
    """Raise FencedOut when this process works for a run that no longer holds its run dir's lock."""
    fence = _fence()
    if fence is None:
        return
    problem = fence_problem(fence["run"], fence["run_id"])
    if problem:
        raise FencedOut(f"{problem}: not writing")


def fence_problem(run: str, run_id: str) -> str | None:
    """Why a process on this node may not write for run `run_id` of the run dir `run` (None: it may): the run dir
    is not there, or the lock is another run's. Read by every commit, and by the cluster preflight on each node."""
    store = open_store(run)
    holder = store.read_json(LOCK)
    if holder is None and store.is_local and not store.local_root.exists():
        return (f"the run dir {run} is not visible on this node ({socket.gethostname()}): it does not exist "
                "on this node; a run on a cluster needs a run dir every node mounts at the same path")
    if holder is None or holder.get("run_id") != run_id:
        who = describe_holder(holder) if holder else "nobody"
        return f"run {run_id} lost the lock of {run} (now held by {who})"
    return None


def fenced_store() -> Store | None:
    """The store of the run this process works for (None outside a run)."""
    fence = _fence()
    return open_store(fence["run"]) if fence else None


def check_inside_run(path: str | os.PathLike) -> None:
    """Raise OutsideRun when this process works for a run and `path` (symlinks followed) is not under its run dir:
    names from workflow files and data files become paths, and a `../` or a planted symlink must not carry a
    write elsewhere."""
    store = fenced_store()
    if store is None or not store.is_local:
        return
    run_dir = store.local_root.resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(run_dir):
        raise OutsideRun(f"refusing to write {path}: it resolves to {target}, outside the run dir {run_dir}")
