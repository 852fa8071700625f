"""Taking over a dead run's lock ends its embedded Ray, and nothing else: a lock file on shared storage is
written by anyone who can write the run dir, so what it says is checked before any process is signalled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simplear.workflow import ray_session
from simplear.workflow.lock import LOCK, LockSettings, RunLock


@pytest.fixture
def own_key_and_ray_root(tmp_path, monkeypatch):
    """A signing key and a Ray temp root of this test's own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    root = tmp_path / "tmp" / "ray"
    root.mkdir(parents=True)
    return root.resolve()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def bystander(*args: str) -> subprocess.Popen:
    """A process of this user whose command line names `args` (as a Ray process names its session dir)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def take_over(run_dir: Path, holder: dict) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"run_id": "dead", "heartbeat": 0, **holder}))
    RunLock.acquire(run_dir, LockSettings(stale_after_s=1)).release()


def session_dir(root: Path, pid: int) -> Path:
    d = root / f"session_2026-12-04_10-00-00_123456_{pid}"
    d.mkdir()
    return d


def test_a_forged_lock_ends_no_process(tmp_path, own_key_and_ray_root, caplog):
    victims = [bystander("/"), bystander("/tmp"), bystander(str(own_key_and_ray_root))]
    here, pid = socket.gethostname(), dead_pid()
    started = [{"pid": v.pid, "started": psutil.Process(v.pid).create_time()} for v in victims]
    real = session_dir(own_key_and_ray_root, pid)
    signed_root = ray_session.claim_session("/")  # signed with our own key, but "/" is no Ray session
    signed_root["processes"] = started
    signed_root["signature"] = ray_session._signature(signed_root)
    other_pid = ray_session.claim_session(str(session_dir(own_key_and_ray_root, pid + 1)))
    forged = [
        {"host": "x", "ray_session_dir": "/"},  # the probe of the issue, in the old lock format
        {"host": "x", "ray_session": {"host": "x", "dir": "/", "processes": started}},
        {"host": here, "pid": pid, "ray_session": {"host": here, "uid": os.getuid(), "dir": str(real),
                                                      "processes": started, "signature": "0" * 64}},
        {"host": here, "pid": pid, "ray_session": signed_root},
        {"host": here, "pid": pid, "ray_session": other_pid},  # a real session of another (maybe live) run
        {"host": here, "pid": pid, "ray_session": {**ray_session.claim_session(str(real)), "host": "elsewhere"}},
    ]
    try:
        for i, holder in enumerate(forged):
            take_over(tmp_path / f"run{i}", holder)
            assert all(v.poll() is None for v in victims), f"lock {holder} ended a bystander"
    finally:
        for v in victims:
            v.kill()
    refusals = [r.getMessage() for r in caplog.records if "leaving every process alone" in r.getMessage()]
    assert len(refusals) == 5, refusals
    assert any("not signed" in m for m in refusals) and any("not a Ray session dir" in m for m in refusals)
    assert any("not by the dead run's pid" in m for m in refusals) and any("not here" in m for m in refusals)


def test_a_proven_dead_session_is_ended_exactly(tmp_path, own_key_and_ray_root):
    pid = dead_pid()
    session = session_dir(own_key_and_ray_root, pid)
    inside = bystander(f"--session-dir={session}")  # names the session: ended
    claimed = bystander()  # names nothing, but the claim lists it by pid and start time: ended
    neighbour = bystander(f"{session}-other", str(own_key_and_ray_root))  # a prefix, not the dir: left alone
    try:
        claim = ray_session.claim_session(str(session))
        assert [p["pid"] for p in claim["processes"]] == [inside.pid]
        claim["processes"].append({"pid": claimed.pid, "started": psutil.Process(claimed.pid).create_time()})
        claim["signature"] = ray_session._signature(claim)
        take_over(tmp_path / "run", {"host": socket.gethostname(), "pid": pid, "ray_session": claim})
        deadline = time.time() + 10
        while (inside.poll() is None or claimed.poll() is None) and time.time() < deadline:
            time.sleep(0.1)
        assert inside.poll() is not None and claimed.poll() is not None
        assert neighbour.poll() is None
    finally:
        for p in (inside, claimed, neighbour):
            p.kill()
    assert oct((tmp_path / "home" / ".simplear" / "session.key").stat().st_mode & 0o777) == "0o600"


def test_names_path_is_not_a_substring_match():
    assert ray_session.names_path("/tmp/ray/s1", "/tmp/ray/s1")
    assert ray_session.names_path("--log-dir=/tmp/ray/s1/logs", "/tmp/ray/s1")
    assert not ray_session.names_path("/tmp/ray/s10", "/tmp/ray/s1")
    assert not ray_session.names_path("python", "/")
    assert not ray_session.names_path("-c", "/tmp/ray/s1")


def test_a_home_where_no_key_can_be_kept_costs_the_takeover_not_the_run(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "file"))  # ~/.simplear cannot be made under a file
    claim = ray_session.claim_session(str(tmp_path))
    assert "signature" not in claim and "cannot keep a signing key" in caplog.text
    assert "cannot be read or made" in ray_session.why_not_ours({**claim, "signature": "0" * 64}, 1)
