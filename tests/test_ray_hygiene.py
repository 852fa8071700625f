"""What a run's Ray exposes: an embedded Ray on loopback with a private token, no library phoning home from any
worker, and a warning when Ray asks for no token (simplear.ray_env)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from simplear.observability.logs import QUIET_ENV
from simplear.ray_env import PHONE_HOME_OFF
from simplear.workflow.engine import connect_ray
from simplear.workflow.spec import RaySettings

ROOT = Path(__file__).resolve().parent.parent

# A driver of its own (the suite's process is attached to the session cluster): an embedded Ray as `simplear run`
# starts it, what a worker of it sees, and every socket its processes listen on.
EMBEDDED_RUN = """
import json, os, sys
import psutil, ray
from simplear.workflow.engine import connect_ray
from simplear.workflow.spec import RaySettings

connect_ray(RaySettings(num_cpus=1, include_dashboard=False), {}, [])
worker_env = ray.get(ray.remote(lambda keys: {k: os.environ.get(k) for k in keys}).remote(sys.argv[1:]))
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
listening = sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ours})
sockets = sum(c.status == "LISTEN" and c.pid in ours for c in psutil.net_connections("inet"))
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening, "sockets": sockets,
                  "worker_env": worker_env, "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


def test_an_embedded_ray_listens_on_loopback_with_a_private_token_and_quiet_workers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in PHONE_HOME_OFF}
    env["HOME"] = str(tmp_path)  # Ray's token goes to ~/.ray/auth_token
    out = subprocess.run([sys.executable, "-c", EMBEDDED_RUN, *PHONE_HOME_OFF], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["node_ip"] == "127.0.0.1"
    # GCS, raylet, object manager, agents, the worker: all of them on loopback only (the dashboard's host is
    # pinned to loopback too: see test_a_ray_without_token_auth_is_warned_about)
    assert seen["sockets"] >= 6 and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen
    assert seen["worker_env"] == PHONE_HOME_OFF
    token = tmp_path / ".ray" / "auth_token"
    assert seen["auth_mode"] == "token" and len(token.read_text()) == 64
    assert token.stat().st_mode & 0o777 == 0o600 and (tmp_path / ".ray").stat().st_mode & 0o077 == 0


@pytest.fixture
def fake_init(monkeypatch):
    """ray.init recorded, not run, for a process with no Ray yet; the phone-home switches unset."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray._private.worker, "_global_node", SimpleNamespace(get_session_dir_path=lambda: "/session"))
    for key in {**PHONE_HOME_OFF, **QUIET_ENV}:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return calls


def test_an_attached_run_gives_its_workers_the_switches_but_not_twice_under_a_job(fake_init, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    connect_ray(RaySettings(address="127.0.0.1:6379"), {}, [])
    assert fake_init[-1]["runtime_env"]["env_vars"] == {**PHONE_HOME_OFF, **QUIET_ENV, "RAY_ADDRESS": "127.0.0.1:6379"}
    assert all(os.environ[k] == v for k, v in PHONE_HOME_OFF.items())  # the driver's own, set before Ray starts

    # A job whose runtime env sets one already: ray.init refuses a variable set twice, so it is left to the job.
    job = {"runtime_env": {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "VLLM_LOGGING_LEVEL": "INFO"}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    connect_ray(RaySettings(address="127.0.0.1:6379"), {}, [])
    assert fake_init[-1]["runtime_env"]["env_vars"] == {k: v for k, v in {**PHONE_HOME_OFF, **QUIET_ENV}.items()
                                                        if k not in ("NO_ALBUMENTATIONS_UPDATE", "VLLM_LOGGING_LEVEL")}


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379"], ids=["embedded", "attached"])
def test_a_ray_without_token_auth_is_warned_about(address, fake_init, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with caplog.at_level(logging.WARNING, logger="simplear.ray_env"):
        connect_ray(RaySettings(address=address), {}, [])
    warning = "Ray token authentication is off (RAY_AUTH_MODE = disabled): whoever reaches "
    assert warning in caplog.text
    assert ("127.0.0.1, i.e. any user of this machine" if address is None else "the cluster at 127.0.0.1:6379") \
        in caplog.text
    assert not (tmp_path / ".ray").exists()  # no token made for a Ray that asks for none
    if address is None:
        assert fake_init[-1]["address"] == "local" and fake_init[-1]["dashboard_host"] == "127.0.0.1"

    caplog.clear()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with caplog.at_level(logging.WARNING, logger="simplear.ray_env"):
        connect_ray(RaySettings(address=address), {}, [])
    assert "token authentication is off" not in caplog.text
