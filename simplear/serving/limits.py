"""Overload and abuse: our bounded queue per replica (429 with Retry-After), Ray Serve's own limits set behind
it, the cap on a request body (413) and the deadline for it to arrive (408). The request timeout (504) is applied
around the batch in the app."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from simplear.serving.config import ServeConfig

# Requests a full replica still takes in so that it can answer them at once (429, 401, 400, health, page):
# without it Serve would hold them at the proxy behind the slow ones.
HEADROOM = 32


def deployment_limits(cfg: ServeConfig) -> dict:
    """Serve's limits for the deployment, set so that ours answer first. Serve sends a replica up to
    `max_ongoing_requests`, more than the replica admits, so the replica itself answers the overflow with our
    429 and message; only a flood past that waits at the proxy, bounded by `max_queued_requests`, and what
    Serve answers there is a 429 with the same Retry-After (its default would be a 503)."""
    from ray.serve.config import BackpressureConfig

    bound = cfg.max_concurrent_requests + HEADROOM
    return {"max_ongoing_requests": bound, "max_queued_requests": bound,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s)}


class Admission:
    """The replica's queue: generation requests admitted (waiting for a batch or in one), at most `limit`.
    Only the replica's event loop touches it, so a plain counter is exact."""

    def __init__(self, limit: int, on_change: Callable[[int], None]):
        self.limit, self.depth, self._on_change = limit, 0, on_change
        on_change(0)  # the gauge exists before the first request

    def enter(self) -> bool:
        if self.depth >= self.limit:
            return False
        self.depth += 1
        self._on_change(self.depth)
        return True

    def leave(self) -> None:
        self.depth -= 1
        self._on_change(self.depth)


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


async def read_body(request, limit: int, timeout_s: float) -> bytes:
    """The body, or BodyTooLarge as soon as it passes `limit` bytes (it is never read in whole), or BodyTooSlow
    when it is not in whole within `timeout_s`: Serve streams a body from the proxy to the replica, so a sender
    that trickles it would otherwise hold one of the replica's request slots for as long as it likes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTooSlow from None
    return b"".join(chunks)
