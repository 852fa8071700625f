"""Who may call: API keys (where they come from, the rule that refuses an open API beyond loopback, the Bearer
check) and, on loopback, the Host check against DNS rebinding.

Keys are read by the process that starts the app (the `simplear serve` driver or the serve stage's task), never
written to workflow.yaml, manifests or logs, and only their SHA-256 digests travel to the replicas: Serve keeps a
deployment's init arguments in its controller, so the keys themselves never leave the starting process.

$SIMPLEAR_API_KEYS is taken out of a driver's environment before Ray starts (`take_api_keys_from_env`): every
worker of an embedded Ray inherits the driver's environment, and a runtime env's variables are shown on the
dashboard. The keys then live in the driver's memory only, and reach the serve stage's task inside its pickled
ServeConfig (`ServeConfig.__getstate__`), which no manifest, log or dashboard page shows.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from simplear.serving.config import ServeConfig

log = logging.getLogger(__name__)

API_KEYS_ENV = "SIMPLEAR_API_KEYS"  # comma separated

_taken_from_env: list[str] = []  # what take_api_keys_from_env removed from this process's environment


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def host_header_is_loopback(value: str | None) -> bool:
    """Whether a Host header names a loopback address. A page of any site can make the browser send requests to a
    name that its DNS answers with 127.0.0.1 (DNS rebinding); the browser then sends that name as the Host."""
    try:
        host = urlsplit(f"//{value}").hostname if value else None
    except ValueError:  # e.g. an unclosed "[::1"
        return False
    return host is not None and is_loopback(host)


def _unique(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def take_api_keys_from_env() -> None:
    """Remove $SIMPLEAR_API_KEYS from this process's environment and keep its keys in memory; a driver calls it
    right before `ray.init`, so that no Ray worker inherits them."""
    global _taken_from_env
    value = os.environ.pop(API_KEYS_ENV, "")
    _taken_from_env = _unique(_taken_from_env + [k.strip() for k in value.split(",") if k.strip()])


def env_api_keys() -> list[str]:
    """The keys of $SIMPLEAR_API_KEYS, whether still in this process's environment or taken out of it."""
    from_env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return _unique(from_env + _taken_from_env)


def refuse_open_api(host: str, keys: list[str], where: str) -> None:
    """ValueError where `host` is beyond loopback and there is no key: the API would be open to the network.
    `where` says whose host it is (the config's, or the one Serve's proxy really listens on)."""
    if not keys and not is_loopback(host):
        raise ValueError(f"{where} is beyond loopback and no API key is configured: refusing to serve an open API; "
                         f"set {API_KEYS_ENV} (comma separated) or api_keys_file (one key per line)")


def _read_keys_file(keys_file: str) -> list[str]:
    try:
        lines = Path(keys_file).read_text().splitlines()
        mode = stat.S_IMODE(os.stat(keys_file).st_mode)
    except OSError as e:
        raise ValueError(f"api_keys_file {keys_file}: {e.strerror or e}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("api_keys_file %s is readable by other users (mode %03o): `chmod 600` it", keys_file, mode)
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"api_keys_file {keys_file} holds no key (one key per line)")
    return keys


def load_api_keys(cfg: ServeConfig) -> list[str]:
    """The keys of $SIMPLEAR_API_KEYS (this process's, or those a driver sent along with `cfg`) and of
    `cfg.api_keys_file` (one per line, `#` comments); ValueError where the named file holds none, or where
    `cfg.host` is beyond loopback and no key is configured."""
    from_file = _read_keys_file(cfg.api_keys_file) if cfg.api_keys_file else []
    keys = _unique(env_api_keys() + cfg.driver_api_keys + from_file)
    refuse_open_api(cfg.host, keys, f"host {cfg.host}")
    return keys


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class BearerAuth:
    """`Authorization: Bearer <key>` against the configured keys' digests; no digests: the API is open."""

    def __init__(self, digests: list[str]):
        self.digests = [d.encode("ascii") for d in digests]

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def refusal(self, header: str | None) -> str | None:
        """None when the request may pass, else the 401's message (which never echoes the key it got)."""
        if not self.required:
            return None
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        presented = key_digest(token.strip()).encode("ascii")
        ok = False
        for d in self.digests:  # every digest is compared, so the time taken does not say which key matched
            ok |= hmac.compare_digest(presented, d)
        return None if ok else "invalid API key"
