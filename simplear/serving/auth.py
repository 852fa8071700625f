"""API keys: where they come from, the rule that refuses an open server beyond loopback, the Bearer check.

Keys are read by the process that starts the app (the `simplear serve` driver or the serve stage's
task), never written to workflow.yaml, manifests or logs, and only their SHA-256 digests travel to the
replicas: Serve keeps a deployment's init arguments in its controller, so the keys themselves never
leave the starting process.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simplear.serving.config import ServeConfig

API_KEYS_ENV = "SIMPLEAR_API_KEYS"  # comma separated


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def load_api_keys(cfg: ServeConfig) -> list[str]:
    """The keys from $SIMPLEAR_API_KEYS and `cfg.api_keys_file` (one per line, `#` comments); ValueError where the
    named file holds none, or where `cfg.host` is beyond loopback and no key is configured (the API would be open)."""
    keys_file, host = cfg.api_keys_file, cfg.host
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if keys_file:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"api_keys_file {keys_file}: {e.strerror or e}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"api_keys_file {keys_file} holds no key (one key per line)")
        keys += from_file
    if not keys and not is_loopback(host):
        raise ValueError(f"host {host} is beyond loopback and no API key is configured: refusing to serve an open API; "
                         f"set {API_KEYS_ENV} (comma separated) or api_keys_file (one key per line)")
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
