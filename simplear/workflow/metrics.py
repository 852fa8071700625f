"""Per-stage figures on Ray's metrics endpoint (Prometheus, the dashboard's Metrics page), tagged by stage and
run (the run folder: two workflows on one cluster, or a rerun beside an earlier run, count apart), and a progress line in the logs every few seconds where no terminal shows progress bars."""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

log = logging.getLogger("simplear.progress")


@lru_cache(maxsize=None)
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = ("stage", "run")):
    from ray.util import metrics

    cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind]
    return cls(name, description=description, tag_keys=tag_keys)


def _on_ray() -> bool:
    import ray

    return ray.is_initialized()


def count_rows(stage: str, done: int, rejected: dict[str, int], run: str = "") -> None:
    """`rejected`: rows by reason (the stages' short codes, e.g. `too_small`, `download:404`: few distinct values)."""
    if not _on_ray():
        return
    tags = {"stage": stage, "run": run}
    _metric("counter", "simplear_rows_done", "input rows a data stage has finished (kept or rejected)").inc(done, tags)
    by_reason = _metric("counter", "simplear_rows_rejected", "input rows a data stage rejected, by reason",
                        ("stage", "run", "reason"))
    for reason, n in rejected.items():
        if n:
            by_reason.inc(n, {**tags, "reason": reason})


# A training row's figures exported as gauges (`simplear_<name>`): the train loop's and GRPO's rows alike.
TRAIN_GAUGES = {"step": "train_step", "loss": "train_loss", "tokens_per_s": "train_tokens_per_s", "lr": "train_lr",
                "reward_mean": "train_reward_mean", "kl": "train_kl"}


def train_gauges(stage: str, row: dict, run: str = "") -> None:
    for key, name in TRAIN_GAUGES.items():
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            gauge(stage, name, value, run)


def gauge(stage: str, name: str, value: float, run: str = "") -> None:
    """`rows_per_s`, `shards_per_s`, `train_step`, ...: exported as `simplear_<name>`."""
    if not _on_ray():
        return
    _metric("gauge", f"simplear_{name}", f"{name} of the stage").set(float(value), {"stage": stage, "run": run})


class ProgressLine:
    """`stage: 1,200 / 5,000 rows (24%), 310 rows/s` at most every `interval_s` seconds, and once at the end."""

    def __init__(self, stage: str, total: int, interval_s: float, unit: str = "rows", run: str = ""):
        self.stage, self.total, self.interval_s, self.unit, self.run = stage, total, interval_s, unit, run
        self.done = 0
        self.t0 = self.last = time.time()

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.time()
        if force or now - self.last >= self.interval_s:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            log.info("%s: %d / %d %s%s, %.1f %s/s", self.stage, self.done, self.total, self.unit, share, rate, self.unit)
            gauge(self.stage, f"{self.unit}_per_s", rate, self.run)
