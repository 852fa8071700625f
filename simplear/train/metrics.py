"""What a run logs and draws: metrics.jsonl and TensorBoard, their summary and the loss curve."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from simplear.train.config import METRICS, TENSORBOARD


class MetricsWriter:
    """Rank 0's per-step metrics: metrics.jsonl (rows past a resumed step dropped) and TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def write(self, metrics: dict) -> None:
        from simplear.workflow.metrics import gauge

        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        stage = self.path.parent.name
        gauge(stage, "train_step", metrics["step"])
        if isinstance(metrics.get("loss"), (int, float)):
            gauge(stage, "train_loss", metrics["loss"])
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        self.tb.close()


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / METRICS
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row  # a resumed run rewrote steps after its checkpoint: the last line wins
    return [by_step[s] for s in sorted(by_step)]


def summarize(rows: list[dict]) -> dict:
    """Start/end figures of the run: the first logged step (the model as it came in) and the mean of the
    last tenth of the logged steps (1 to 10 of them, to smooth the batch noise)."""
    if not rows:
        return {}
    k = max(1, min(10, len(rows) // 10))
    out: dict[str, Any] = {"logged_steps": len(rows), "last_step": rows[-1]["step"]}
    for key in ("loss", "image_loss", "text_loss"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[f"{key}_start"] = round(values[0], 4)
            out[f"{key}_end"] = round(statistics.fmean(values[-k:]), 4)
    speeds = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r] or [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if speeds:
        out["tokens_per_s"] = round(statistics.median(speeds), 1)
    return out


def plot_loss_curve(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label in (("loss", "loss (trained tokens)"), ("image_loss", "image-token loss"), ("text_loss", "text-token loss")):
        if any(key in r for r in rows):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=label, linewidth=1)
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="gray", linewidth=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    from simplear.workflow.manifest import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
