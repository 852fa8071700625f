"""What a run logs: metrics.jsonl and TensorBoard, read back and summarised (the figures: `simplear.train.figures`)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from simplear.train.config import METRICS, TENSORBOARD


class MetricsWriter:
    """Rank 0's per-step metrics: metrics.jsonl (rows past a resumed step dropped) and TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, run: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / METRICS
        self.stage, self.run = out_dir.name, run or str(out_dir.parent)  # the labels of the stage's gauges
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def write(self, metrics: dict) -> None:
        from simplear.workflow.metrics import train_gauges

        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        train_gauges(self.stage, metrics, self.run)
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, metrics["step"])

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / METRICS
    return parse_metrics(path.read_text()) if path.exists() else []


def parse_metrics(text: str) -> list[dict]:
    by_step = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row  # a resumed run rewrote steps after its checkpoint: the last line wins
    return [by_step[s] for s in sorted(by_step)]


LOSS_KEYS = ("loss", "image_loss", "text_loss")


def summarize(rows: list[dict], keys: tuple[str, ...] = LOSS_KEYS, smooth_start: bool = False) -> dict:
    """Start/end figures of the run. The end is the mean of the last tenth of the logged steps (1 to 10 of
    them, to smooth the batch noise); the start is the first logged step (a loss: the model as it came in),
    or with `smooth_start` the mean of as many first steps (a group reward is as noisy at the start as at the end)."""
    if not rows:
        return {}
    k = max(1, min(10, len(rows) // 10))
    out: dict[str, Any] = {"logged_steps": len(rows), "last_step": rows[-1]["step"]}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[f"{key}_start"] = round(statistics.fmean(values[:k]) if smooth_start else values[0], 5)
            out[f"{key}_end"] = round(statistics.fmean(values[-k:]), 5)
    speeds = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r] or [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if speeds:
        out["tokens_per_s"] = round(statistics.median(speeds), 1)
    return out
