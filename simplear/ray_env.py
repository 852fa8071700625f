"""How every driver of the project starts or joins Ray (`init_ray`), so that no run exposes more than it must.

- No library phones home from a worker: the switches below are set in the driver before Ray starts (an embedded
  Ray's workers inherit its environment) and, on an attached cluster, in the job's runtime env.
- An embedded Ray serves one run on one machine: its servers listen on loopback only, not on the node's IP.
- Ray 2.60 turns token authentication on for a new local Ray and writes the token with the process umask
  (world-readable under the usual 022): whoever reads it can run code on every Ray of this user. The token is
  created private before Ray would write it, and one left readable is made private.
- A Ray without token authentication is said so in the log (Ray itself stays silent when RAY_AUTH_MODE=disabled).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from simplear.observability.logs import quiet_env

log = logging.getLogger("simplear.ray_env")

LOOPBACK = "127.0.0.1"

# What each library reads, when it is imported or starts its engine, to send nothing home.
PHONE_HOME_OFF: dict[str, str] = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (imported by img2dataset): a PyPI version check on import
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray: the usage report of clusters started by `ray start`
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub: telemetry of transformers, datasets and trl's trainers
    "VLLM_NO_USAGE_STATS": "1",  # vLLM: the usage report of each engine
    "DO_NOT_TRACK": "1",  # the common opt-out (vLLM and huggingface_hub read it too), for what plugin stages import
}


def phone_home_off() -> dict[str, str]:
    """Set the switches in this process, keeping a value the user set, so that whatever it starts inherits them;
    returns them as set, for a runtime env."""
    for key, value in PHONE_HOME_OFF.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in PHONE_HOME_OFF}


# Ray Data's autoscaling coordinator keeps a killed driver's CPU reservation until it expires (180 s by default;
# see pipelines/reservations.py): stage tasks run with 30 s, three of the ~10 s renewal gaps of a live execution.
RAY_DATA_EXPIRE_ENV = "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"


def ray_data_expiry() -> dict[str, str]:
    """The expiry for a stage task's runtime env: the user's when set, else 30 s."""
    return {RAY_DATA_EXPIRE_ENV: os.environ.get(RAY_DATA_EXPIRE_ENV, "30")}


def auth_token_path() -> Path:
    """The token file Ray 2.60 reads when RAY_AUTH_TOKEN is not set."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def init_ray(address: str | None, env_vars: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Attach to the cluster at `address`, or (None) start an embedded Ray of this process's own, even when another
    Ray runs on this host; `env_vars` and `kwargs` go to `ray.init`."""
    import ray

    env_vars = dict(env_vars or {})
    switches = {**phone_home_off(), **quiet_env()}  # quiet_env: libraries' per-event output off the console
    if address:
        taken = _job_env_vars()  # ray.init refuses to set again a variable the job's runtime env sets
        env_vars.update({k: v for k, v in switches.items() if k not in taken})
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if address:
        ray.init(address=address, **kwargs)
        _warn_if_unauthenticated(f"the cluster at {address}")
        return
    _keep_token_private()
    with _node_ip_on_loopback():
        ray.init(address="local", dashboard_host=LOOPBACK, **kwargs)
    _warn_if_unauthenticated(f"its ports on {LOOPBACK}, i.e. any user of this machine")


def _job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env this driver's job was submitted with (none outside a job)."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def _keep_token_private() -> None:
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return  # no token file in use
    path = auth_token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            log.warning("%s was readable by other users of this machine: made private (mode 600)", path)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own: 256 random bits
    log.info("new Ray token in %s (readable by you only)", path)


@contextmanager
def _node_ip_on_loopback() -> Iterator[None]:
    """Ray 2.60 binds every server of a node (GCS, raylet, object manager, agents, workers) to the node's IP, and
    ray.init turns a loopback `_node_ip_address` back into the routable IP. It picks 127.0.0.1 itself where it
    runs without multi-node clusters (`ray_constants.ENABLE_RAY_CLUSTER`, off on macOS and Windows), which is what
    an embedded Ray is: off while it starts."""
    from ray._private import ray_constants

    before, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _warn_if_unauthenticated(reachable_by: str) -> None:
    """After a successful ray.init, a driver without token auth means a Ray that does not ask for one."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode or "").lower() != "token":
        log.warning("Ray token authentication is off (RAY_AUTH_MODE %s): whoever reaches %s can run code as the "
                    "user of this Ray. Token authentication is Ray's default for a Ray it starts, unless "
                    "RAY_AUTH_MODE=disabled.", f"= {mode}" if mode else "unset", reachable_by)
