"""One report across checkpoints: report.json (every figure) and report.html (the table, per-category bars, and
the same prompts and seeds as image grids side by side, pretrain -> SFT -> GRPO)."""

from __future__ import annotations

import html
import json
from typing import Callable

from simplear.storage import Store, join
from simplear.workflow.manifest import commit_json, committed

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.se { color: #777; font-size: 85%; }
.bar { display: inline-block; height: 10px; background: #4a7bd0; vertical-align: middle; }
.grid td { text-align: center; vertical-align: top; }
.grid img { image-rendering: pixelated; width: 96px; height: 96px; margin: 1px; }
.note { color: #555; max-width: 60em; }
"""


def write_report(store: Store, stage: str, report: dict) -> None:
    """`report`: {"checkpoints": [{name, path, size}], "sets": {set: {"scores": {scorer: {checkpoint: aggregate}},
    "grids": [{"prompt", "images": {checkpoint: [relative paths]}}]}}, "notes": [...]}; aggregates hold
    "overall" and optionally "categories" and "figures", each {"mean", "se", "count"} (`simplear.scorers`)."""
    commit_json(store, join(stage, REPORT_JSON), report)
    with committed(store, join(stage, REPORT_HTML)) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")


def _figure(agg: dict | None) -> str:
    if not agg or agg.get("mean") is None:
        return "–"
    se = f" <span class='se'>± {agg['se']:.3f}</span>" if agg.get("se") is not None else ""
    return f"{agg['mean']:.3f}{se} <span class='se'>(n={agg.get('count', 0)})</span>"


def render_html(report: dict) -> str:
    names = [c["name"] for c in report["checkpoints"]]
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SimpleAR evaluation</title><style>{STYLE}</style>"
             "</head><body><h1>Evaluation</h1>"]
    parts += [f"<p class='note'>{e(n)}</p>" for n in report.get("notes", [])]
    parts.append("<table id='checkpoints'><tr><th>checkpoint</th><th>folder</th><th>size</th></tr>")
    parts += [f"<tr><td>{e(c['name'])}</td><td>{e(str(c['path']))}</td><td>{e('x'.join(map(str, c['size'])))}</td></tr>"
              for c in report["checkpoints"]]
    parts.append("</table>")
    for set_name, s in report["sets"].items():
        parts.append(f"<h2>{e(set_name)}</h2>")
        if s.get("protocol"):
            p = s["protocol"]
            parts.append(f"<p class='note'>Protocol {e(p['kind'])}: drawn as the reference benchmark scripts draw "
                         f"(seed {p['seed']}, {p['chunks']} process(es), {p['loader_workers']} loader workers; "
                         f"{e(json.dumps(p['sampling']))})"
                         + "".join(f"; {e(n)} at {e('x'.join(map(str, sz)))}, not the protocol's 1024x1024"
                                   for n, sz in p.get("not_at_its_size", {}).items()) + ".</p>")
        parts.append(scores_html(s, names))
        parts.append(grids_html(s.get("grids", []), names, str))
    parts.append("</body></html>")
    return "\n".join(parts)


def scores_html(s: dict, names: list[str]) -> str:
    """A set's score table (overall, the release's published figure, each figure alone) and its category bars;
    the run report shows the same tables."""
    e = html.escape
    parts = ["<table class='scores'><tr><th>score</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    for scorer, by_ck in s["scores"].items():
        parts.append(f"<tr><td>{e(scorer)}</td>" + "".join(f"<td>{_figure((by_ck.get(n) or {}).get('overall'))}</td>"
                                                           for n in names) + "</tr>")
        published = (s.get("reference") or {}).get(scorer) or {}
        if published:  # a release's published figure beside ours
            parts.append(f"<tr class='reference'><td>{e(scorer)}: published</td>" + "".join(
                f"<td>{published[n]['figure']:.3f} <span class='se'>({e(published[n]['source'])})</span></td>"
                if n in published else "<td></td>" for n in names) + "</tr>")
        figures = dict.fromkeys(f for agg in by_ck.values() for f in (agg or {}).get("figures", {}))
        for f in figures:  # e.g. the demo's colour attribution and shape correctness, each alone
            parts.append(f"<tr><td>{e(scorer)}: {e(f)}</td>" + "".join(
                f"<td>{_figure(((by_ck.get(n) or {}).get('figures') or {}).get(f))}</td>" for n in names) + "</tr>")
    parts.append("</table>")
    for scorer, by_ck in s["scores"].items():
        cats = sorted({c for agg in by_ck.values() for c in (agg or {}).get("categories", {})})
        if not cats:
            continue
        parts.append(f"<h3>{e(scorer)} by category</h3><table class='categories'><tr><th>category</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for cat in cats:
            cells = []
            for n in names:
                agg = ((by_ck.get(n) or {}).get("categories") or {}).get(cat)
                width = int(round(100 * max(0.0, min(1.0, agg["mean"])))) if agg and agg.get("mean") is not None else 0
                cells.append(f"<td><span class='bar' style='width:{width}px'></span> {_figure(agg)}</td>")
            parts.append(f"<tr><td>{e(cat)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def grids_html(grids: list[dict], names: list[str], src: Callable[[str], str | None]) -> str:
    """The same prompts and seeds side by side; `src` turns an image path (relative to the eval stage) into what
    an <img> loads (the path itself here, the image inlined in the run report)."""
    if not grids:
        return ""
    e = html.escape
    parts = ["<h3>Same prompts, same seeds</h3><table class='grid'><tr><th>prompt</th>"
             + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    for row in grids:
        cells = "".join("<td>" + "".join(f"<img src='{e(url)}' alt='{e(n)}'>" for url in map(src, row["images"].get(n, []))
                                         if url) + "</td>" for n in names)
        parts.append(f"<tr><td>{e(row['prompt'])}</td>{cells}</tr>")
    parts.append("</table>")
    return "\n".join(parts)
