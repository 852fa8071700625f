"""Shared fixtures: one real Ray head node per test session, started and stopped by its own temp dir.

Never `ray stop`: that would kill every Ray on the host. Processes are found by the session's
temp dir in their command lines and ended one by one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from simplear.ray_env import phone_home_off
from simplear.workflow.ray_session import stop_ray_session

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
phone_home_off()  # the suite's clusters are started by `ray start`, with this environment
# The suite SIGKILLs drivers on purpose. A killed driver's Ray Data reservation (with the cluster-wide
# autoscaling coordinator) lives on for this long, 180 s by default, and the datasets that run meanwhile
# split the cluster with it. Every driver and worker of the suite's clusters inherits this.
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard_url: str | None
    temp_dir: str
    env: dict
    metrics_url: str  # the node's Prometheus endpoint (ray.util.metrics, Ray Data, Ray Train)

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        stop_ray_by_temp_dir(self.temp_dir)


def stop_ray_by_temp_dir(temp_dir: str) -> None:
    stop_ray_session(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_ray_head(num_cpus: int = 2, dashboard: bool = False, auth: bool = False, home: str | None = None) -> RayHead:
    temp_dir = tempfile.mkdtemp(prefix="/tmp/srt-")  # short: Ray's socket paths have a length limit
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token" if auth else "disabled"
    env["RAY_metrics_report_interval_ms"] = "2000"  # metrics reach the endpoint within seconds
    # Job entrypoints say `python`: it must be this venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if home:
        env["HOME"] = home
    if auth:
        token = Path(env.get("HOME", Path.home())) / ".ray" / "auth_token"
        if not token.exists():
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text(secrets.token_hex(32))
    cmd = [
        RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--metrics-export-port={metrics_port}",
        f"--include-dashboard={'true' if dashboard else 'false'}",
    ]
    dashboard_url = None
    if dashboard:
        dport = free_port()
        cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dport}", f"--dashboard-agent-listen-port={free_port()}"]
        dashboard_url = f"http://127.0.0.1:{dport}"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        stop_ray_by_temp_dir(temp_dir)
        raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
    return RayHead(address=f"127.0.0.1:{port}", dashboard_url=dashboard_url, temp_dir=temp_dir, env=env,
                   metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")


def add_worker_node(head: RayHead, num_cpus: int = 1) -> None:
    """A second node of `head`'s cluster on this machine (loopback), in the head's temp dir, so `head.stop()` ends it too."""
    cmd = [RAY, "start", f"--address={head.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--temp-dir={head.temp_dir}", "--disable-usage-stats"]
    out = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"ray start (worker node) failed:\n{out.stdout}\n{out.stderr}")


def wait_for_ray_data_to_own_the_cluster(timeout_s: float = 60) -> float:
    """Wait until no other dataset holds a Ray Data reservation (a live one, or a killed driver's that has not
    expired yet), so the next dataset gets every CPU; return the CPUs a probe request got last.

    Ray Data 2.60 splits the cluster's CPUs between the live requesters of its autoscaling coordinator; a test
    that checks how many tasks run at once needs the whole cluster. The probe is a request of nothing that
    asks for a share of what is left, as each dataset's executor does; it is cancelled before returning."""
    import time

    import ray
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator

    coordinator = get_or_create_autoscaling_coordinator()
    probe, total = "simplear-tests-probe", ray.cluster_resources().get("CPU", 0)
    deadline, got = time.time() + timeout_s, 0.0
    try:
        while True:
            ray.get(coordinator.request_resources.remote(requester_id=probe, resources=[], expire_after_s=30,
                                                         request_remaining=["CPU"]))
            reserved = ray.get(coordinator.get_reserved_resources.remote(probe, recompute=True))
            got = sum(r.get("CPU", 0) for r in reserved.values())
            if got >= total or time.time() > deadline:
                return got
            time.sleep(2)
    finally:
        ray.get(coordinator.cancel_request.remote(probe))


@pytest.fixture(scope="session")
def tiny_clip():
    """(config, reward) of the built-in tiny random CLIP (`simplear.tiny.TINY_CLIP`, seeded weights)."""
    from simplear.rewards import ClipReward, ClipRewardConfig

    config = ClipRewardConfig(model="simplear-tiny-clip", pretrained=None, device="cpu")
    return config, ClipReward(config)


@dataclass
class S3Server:
    """A real S3 endpoint on loopback (moto's server app, tests/s3_server.py) that counts the requests it answers."""

    url: str
    env: dict

    def bucket(self, name: str) -> str:
        """A new empty bucket; returns its s3:// URI."""
        import boto3

        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=name)
        return f"s3://{name}"

    def requests(self) -> list[tuple[str, str, int]]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_requests", timeout=10) as r:
            return [tuple(x) for x in json.loads(r.read())]

    def reset_requests(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/_requests/reset", method="POST"), timeout=10).close()


@pytest.fixture(scope="session")
def s3_server():
    """Started before the session's Ray cluster, whose nodes inherit its settings as a cluster's nodes carry their
    own credentials: the standard AWS variables, with keys moto accepts. Stopped at the end of the session."""
    from s3_server import launch

    proc, url, env = launch(tempfile.mkstemp(prefix="s3-server-", suffix=".log")[1])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield S3Server(url, env)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """The session's Ray cluster (no dashboard, no auth); tests attach with ray.init(address=...). Its nodes see
    the session's S3 server (s3_server)."""
    head = start_ray_head(num_cpus=2)
    yield head
    import ray

    if ray.is_initialized():
        ray.shutdown()
    head.stop()


def attach_ray(head: RayHead) -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        # Workers import the tests' own stage kinds (tests/stage_kinds.py) by module name.
        # RAY_ADDRESS: Ray Train's helpers must find this cluster, not another one on the host (engine.connect_ray).
        env_vars = {"PYTHONPATH": str(ROOT / "tests"), "OMP_WAIT_POLICY": "PASSIVE", "RAY_ADDRESS": head.address}
        runtime_env = {"env_vars": env_vars}
        ray.init(address=head.address, namespace="simplear-tests", log_to_driver=True, runtime_env=runtime_env)


@pytest.fixture
def ray_session(ray_head):
    """This process attached to the session cluster, for tests that call the engine in-process."""
    attach_ray(ray_head)
    yield ray_head


@dataclass
class ServedApp:
    url: str  # the app's root, e.g. http://127.0.0.1:PORT
    checkpoint: Path
    config: object  # simplear.serving.ServeConfig
    port: int


@pytest.fixture(scope="session")
def serve_torch_app(ray_head, tmp_path_factory):
    """Ray Serve on the session cluster (proxy on 127.0.0.1:free port) with the torch-engine app over a tiny
    checkpoint; the API and web page tests share it. Serve is shut down at the end of the session."""
    from ray import serve

    from serve_support import make_checkpoint
    from simplear.serving import ServeConfig, start

    attach_ray(ray_head)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")
    port = free_port()
    cfg = ServeConfig(engine="torch", port=port, app_name="torch", sizes=["32x32", "64x64"], max_n=4,
                      max_prompt_chars=200, batch_wait_timeout_s=0.2, max_batch_size=8, smoke_prompt=None)
    start(ckpt, cfg, cpus=0)
    yield ServedApp(url=cfg.url, checkpoint=ckpt, config=cfg, port=port)
    serve.shutdown()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NEEDS_CHROMIUM = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                    reason="needs Debian's chromium and chromium-driver (scripts/install.sh installs them)")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by selenium, for the pages a person opens (the serve page, the reports)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="srt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"]:
        options.add_argument(flag)
    # an explicit driver path: selenium never looks for (or downloads) a driver or a browser
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
