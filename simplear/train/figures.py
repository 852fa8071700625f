"""The curves a training stage draws from its metrics rows: one plotter, panels chosen by the stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Panel:
    """One axis of the figure: the metrics keys drawn on it (absent keys are left out)."""

    ylabel: str
    curves: list[tuple[str, str]]  # (metrics key, legend label)
    height: float = 1.0
    log: bool = False
    band: str | None = None  # a key whose value is drawn as ± around the first curve (e.g. the group's reward std)
    twin: Panel | None = field(default=None)  # a second y axis on the same panel


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """Steps and values where `key` was logged (GRPO steps that reuse a generation log no rewards)."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], panels: list[Panel], title: str = "") -> bytes:
    """The figure as PNG bytes: the caller commits them where the run keeps its outputs (ctx.output)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [p.height for p in panels]})
    colors = iter(f"C{i}" for i in range(100))
    for ax, panel in zip(axes[:, 0], panels):
        _draw(ax, panel, rows, colors)
        if panel.twin is not None:
            _draw(ax.twinx(), panel.twin, rows, colors)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def _draw(ax, panel: Panel, rows: list[dict], colors) -> None:
    drawn = 0
    for i, (key, label) in enumerate(panel.curves):
        x, y = series(rows, key)
        if not x:
            continue
        color = next(colors)
        ax.plot(x, y, label=label, color=color, linewidth=1.5 if i == 0 else 1)
        drawn += 1
        if i == 0 and panel.band:
            spread = dict(zip(*series(rows, panel.band)))
            lo = [v - spread.get(s, 0.0) for s, v in zip(x, y)]
            hi = [v + spread.get(s, 0.0) for s, v in zip(x, y)]
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, label="± std")
    ax.set_ylabel(panel.ylabel)
    if panel.log and drawn:
        ax.set_yscale("log")
    if drawn > 1 or panel.band:
        ax.legend(loc="best", fontsize="small")


def loss_panels() -> list[Panel]:
    """Pretrain and SFT: the losses (log scale) over the learning rate."""
    return [Panel("cross-entropy", [("loss", "loss (trained tokens)"), ("image_loss", "image-token loss"),
                                    ("text_loss", "text-token loss")], height=3, log=True),
            Panel("lr", [("lr", "lr")])]


def plot_loss_curve(rows: list[dict], title: str = "") -> bytes:
    return plot_curves(rows, loss_panels(), title)
