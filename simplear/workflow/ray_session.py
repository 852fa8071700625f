"""The embedded Ray a run starts: what the run records of it, and ending exactly that Ray once the run is dead.

A run dir may sit on storage a whole team can write, so a lock file is not evidence of anything: a planted
`_LOCK.json` naming "/" as a dead run's Ray session must not make the next run signal every process that
mentions "/". A run therefore records its embedded Ray as a *claim* (host, user, the resolved session dir, the
pids and start times of the session's processes) signed with a key only this user can read
(`~/.simplear/session.key`). A later run ends a claimed session only when every check holds: the claim is
signed with its own key, made on this host by this user, the session dir is a Ray session dir under Ray's
temp root, named for the dead holder's pid, and still there; and then only processes of this user that name
that dir exactly (an argument equal to it or a path under it, or an open file under it), the claimed pids
whose start time still matches, and their children. Anything else is left alone, with a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
from pathlib import Path

log = logging.getLogger("simplear.lock")

SESSION_NAME = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d{6}_(\d+)")  # Ray: session_<date>_<pid>


def key_path() -> Path:
    return Path.home() / ".simplear" / "session.key"


def _key() -> bytes:
    """This user's signing key, created private (0600) on first use."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run made it meanwhile
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _signature(claim: dict) -> str:
    body = json.dumps({k: v for k, v in claim.items() if k != "signature"}, sort_keys=True).encode()
    return hmac.new(_key(), body, hashlib.sha256).hexdigest()


def names_path(value: str, root: str) -> bool:
    """Whether a command-line argument (or `--flag=value`) is `root` or a path under it: not a substring match."""
    if value.startswith("-") and "=" in value:
        value = value.split("=", 1)[1]
    return value == root or value.startswith(root.rstrip(os.sep) + os.sep)


def session_processes(root: str) -> list:
    """This user's processes that name `root` (a Ray session or temp dir) in an argument or an open file, and
    their children. Agents rename themselves (`ray::DashboardAgent`) and outlive a killed raylet, but keep
    their log files in the session dir open."""
    import psutil

    me, uid = os.getpid(), os.getuid()
    procs = {}
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        if p.pid == me or p.info["uids"] is None or p.info["uids"].real != uid:
            continue
        try:
            if any(names_path(arg, root) for arg in (p.info["cmdline"] or [])) or any(
                    names_path(f.path, root) for f in p.open_files()):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    procs.pop(me, None)
    return list(procs.values())


def end_processes(procs: list, timeout: float = 15.0, again=lambda: []) -> int:
    """TERM, then KILL what is left (and what `again()` finds then). Never a broad `ray stop`."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive + again():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def stop_ray_session(root: str, timeout: float = 15.0) -> int:
    """End every process of this user naming `root`: for Ray sessions and clusters this process started itself
    (the tests' clusters, by their temp dir)."""
    return end_processes(session_processes(root), timeout, again=lambda: session_processes(root))


def claim_session(session_dir: str) -> dict:
    """What a run records in its lock of the embedded Ray it just started, signed with this user's key."""
    resolved = str(Path(session_dir).resolve())
    claim = {
        "host": socket.gethostname(),
        "uid": os.getuid(),
        "dir": resolved,
        "processes": [{"pid": p.pid, "started": p.create_time()} for p in session_processes(resolved)],
    }
    try:
        claim["signature"] = _signature(claim)
    except OSError as e:  # e.g. a read-only home: the run goes on, but nothing can prove this Ray is its own
        log.warning("cannot keep a signing key at %s (%s): if this run dies, the next one will leave its Ray's "
                    "processes running", key_path(), e)
    return claim


def _ray_temp_root() -> Path:
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir()).resolve()


def why_not_ours(claim: dict, holder_pid) -> str | None:
    """None when `claim` provably names a Ray session the dead holder started here as this user, else why not."""
    if not isinstance(claim, dict) or not isinstance(claim.get("dir"), str):
        return "the lock records no embedded Ray session"
    if claim.get("host") != socket.gethostname():
        return f"the dead run's Ray ran on host {claim.get('host')!r}, not here"
    try:
        signed = isinstance(claim.get("signature"), str) and hmac.compare_digest(claim["signature"], _signature(claim))
    except OSError as e:
        return f"this user's signing key {key_path()} cannot be read or made: {e}"
    if not signed:
        return f"the claim is not signed with this user's key ({key_path()}): forged, or written by another user"
    if claim.get("uid") != os.getuid():
        return f"the dead run ran as uid {claim.get('uid')}, not as this user"
    path = Path(claim["dir"])
    name = SESSION_NAME.fullmatch(path.name)
    if not path.is_absolute() or path.resolve() != path or path.parent != _ray_temp_root() or not name:
        return f"{path} is not a Ray session dir under Ray's temp root {_ray_temp_root()}"
    if str(holder_pid) != name.group(1):
        return f"{path} was started by pid {name.group(1)}, not by the dead run's pid {holder_pid}"
    if not path.is_dir() or path.stat().st_uid != os.getuid():
        return f"{path} is gone or not this user's"
    return None


def end_dead_session(holder: dict) -> int:
    """End what a dead holder's embedded Ray left running, if the lock proves it is that Ray; returns how many."""
    import psutil

    claim = holder.get("ray_session")
    if claim is None:
        return 0
    why = why_not_ours(claim, holder.get("pid"))
    if why:
        log.warning("leaving every process alone: %s", why)
        return 0
    procs = {p.pid: p for p in session_processes(claim["dir"])}
    for rec in claim.get("processes", []):
        try:
            p = psutil.Process(int(rec["pid"]))
            if abs(p.create_time() - float(rec["started"])) <= 1.0 and p.uids().real == os.getuid():
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, KeyError, TypeError, ValueError):
            pass
    procs.pop(os.getpid(), None)
    n = end_processes(list(procs.values()), again=lambda: session_processes(claim["dir"]))
    log.warning("ended %d processes the dead run's embedded Ray left (%s)", n, claim["dir"])
    return n
