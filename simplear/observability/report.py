"""`<run_dir>/report.html`: the run on one page, written at the end of every run and by `simplear report`.

One file a person can mail or open from object storage: every image is inlined (a run dir on S3 has no relative
links a browser follows), the eval stage's own report is linked beside its tables. What each stage shows comes
from what it already leaves: its manifest (state, duration, rows, rejected rows by reason, figures, config,
resources, the hardware it ran on) and its artifacts (curves, sample grids, eval report, serve endpoint)."""

from __future__ import annotations

import base64
import html
import json
import time
from typing import Any

import yaml

from simplear.evaluation.report import REPORT_HTML, REPORT_JSON, STYLE, grids_html, scores_html
from simplear.storage import join
from simplear.train.config import SAMPLES, SAMPLES_BEFORE
from simplear.workflow.manifest import committed
from simplear.workflow.spec import ResolvedWorkflow
from simplear.workflow.status import StageStatus, headline, stage_note, workflow_status

REPORT = "report.html"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_INLINE_BYTES = 8 * 2**20  # a larger image is linked, not inlined
GRID_ROWS = 4  # eval prompts shown here; the eval report has them all

_RUN_STYLE = STYLE + """
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.state-done { color: #1a7f37; } .state-failed { color: #c62828; } .state-stale, .state-partial { color: #b26a00; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 520px; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 90%; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; max-width: 100em; }
.kv td, #stages td:nth-child(7), #stages td:nth-child(8) { text-align: left; }
"""


def write_run_report(wf: ResolvedWorkflow, statuses: dict[str, StageStatus] | None = None) -> str:
    """Writes the page (whole, as every run dir file); returns its URI."""
    statuses = statuses if statuses is not None else workflow_status(wf)
    with committed(wf.store, REPORT) as tmp:
        tmp.write_text(render(wf, statuses), encoding="utf-8")
    return wf.store.child(REPORT)


def render(wf: ResolvedWorkflow, statuses: dict[str, StageStatus]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SimpleAR run: {e(wf.run_uri)}</title>"
             f"<style>{_RUN_STYLE}</style></head><body><h1>SimpleAR run</h1>",
             f"<table class='kv' id='run'><tr><td>run dir</td><td>{e(wf.run_uri)}</td></tr>"
             f"<tr><td>workflow</td><td>{e(str(wf.path))} (profile {e(wf.profile)})</td></tr>"
             f"<tr><td>report written</td><td>{time.strftime('%Y-%m-%d %H:%M:%S %Z')}</td></tr></table>",
             _summary(statuses)]
    for name, st in statuses.items():
        parts.append(_stage(wf, st, statuses))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(statuses: dict[str, StageStatus]) -> str:
    e = html.escape
    rows = ["<table id='stages'><tr><th>stage</th><th>kind</th><th>state</th><th>duration</th><th>rows kept</th>"
            "<th>rejected</th><th>key figures</th><th>note</th></tr>"]
    for name, st in statuses.items():
        kr = st.rows_kept_rejected
        kind = (st.manifest or {}).get("kind", "")
        duration = "" if st.duration_s is None else f"{st.duration_s:.1f} s"
        rows.append(f"<tr><td><a href='#stage-{e(name)}'>{e(name)}</a></td><td>{e(kind)}</td>"
                    f"<td class='state-{e(st.state)}'>{e(st.state)}</td><td>{duration}</td>"
                    f"<td>{'' if kr is None else f'{kr[0]:,}'}</td><td>{'' if kr is None else f'{kr[1]:,}'}</td>"
                    f"<td>{e(headline(st.manifest) if st.manifest else '')}</td><td>{e(stage_note(st))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _stage(wf: ResolvedWorkflow, st: StageStatus, statuses: dict[str, StageStatus]) -> str:
    e = html.escape
    m = st.manifest or {}
    parts = [f"<h2 id='stage-{e(st.name)}'>{e(st.name)} <span class='state-{e(st.state)}'>({e(st.state)})</span></h2>"]
    if not m:
        parts.append(f"<p class='note'>No manifest: {e(stage_note(st) or 'not run yet')}.</p>")
        return "\n".join(parts)
    metrics = m.get("metrics") or {}
    by_reason = metrics.get("by_reason") or {}
    if by_reason:
        parts.append("<h3>Rejected rows by reason</h3><table class='reasons'><tr><th>reason</th><th>rows</th></tr>"
                     + "".join(f"<tr><td>{e(r)}</td><td>{n:,}</td></tr>" for r, n in sorted(by_reason.items(), key=lambda x: -x[1]))
                     + "</table>")
    figures = {k: v for k, v in _flat(metrics).items() if not k.startswith("by_reason")}
    if figures:
        parts.append("<h3>Figures</h3><table class='kv figures'>"
                     + "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in figures.items()) + "</table>")
    parts.append(_images(wf, st, statuses))
    artifacts = m.get("artifacts") or []
    if REPORT_JSON in artifacts:
        parts.append(_eval(wf, st.name))
    if "endpoint.json" in artifacts:
        endpoint = wf.store.read_json(join(st.name, "endpoint.json")) or {}
        parts.append("<h3>Endpoint</h3><table class='kv endpoint'>"
                     + "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in _flat(endpoint).items()) + "</table>")
    parts.append(_hardware(m))
    parts.append(f"<details><summary>resolved config</summary><pre>{e(yaml.safe_dump(m.get('config') or {}, sort_keys=False))}"
                 "</pre></details>")
    return "\n".join(parts)


def _images(wf: ResolvedWorkflow, st: StageStatus, statuses: dict[str, StageStatus]) -> str:
    """The stage's images; a training stage's grid after it, beside the grid before it (its own `samples_before`,
    else the grid of the training stage it starts from)."""
    artifacts = (st.manifest or {}).get("artifacts") or []
    images = [a for a in artifacts if a[a.rfind("."):].lower() in IMAGE_TYPES]
    out = []
    if SAMPLES in images and SAMPLES_BEFORE not in images:
        upstream = [n for n in (st.manifest or {}).get("needs", [])
                    if SAMPLES in ((statuses.get(n) and statuses[n].manifest) or {}).get("artifacts", [])]
        if upstream:
            out.append(_figure(wf, join(upstream[-1], SAMPLES), f"before: {upstream[-1]}'s samples (where it starts from)"))
    for a in images:
        caption = {SAMPLES: "after: samples of the final checkpoint", SAMPLES_BEFORE: "before: samples of the initial checkpoint"}.get(a, a)
        out.append(_figure(wf, join(st.name, a), caption))
    return "<div class='images'>" + "".join(out) + "</div>" if out else ""


def _figure(wf: ResolvedWorkflow, key: str, caption: str) -> str:
    e = html.escape
    src = _data_uri(wf, key)
    body = f"<img src='{src}' alt='{e(key)}'>" if src else f"<a href='{e(key)}'>{e(key)}</a> (not inlined)"
    return f"<figure>{body}<figcaption>{e(caption)}</figcaption></figure>"


def _data_uri(wf: ResolvedWorkflow, key: str) -> str | None:
    blob = wf.store.read(key)
    if blob is None or len(blob.data) > MAX_INLINE_BYTES:
        return None
    mime = IMAGE_TYPES.get(key[key.rfind("."):].lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(blob.data).decode()}"


def _eval(wf: ResolvedWorkflow, stage: str) -> str:
    report = wf.store.read_json(join(stage, REPORT_JSON)) or {}
    names = [c["name"] for c in report.get("checkpoints", [])]
    e = html.escape
    page = e(join(stage, REPORT_HTML))
    parts = [f"<h3>Evaluation</h3><p class='note'>Every prompt and figure: <a href='{page}'>{page}</a></p>"]
    for set_name, s in (report.get("sets") or {}).items():
        parts.append(f"<h4>{e(set_name)}</h4>")
        parts.append(scores_html(s, names))
        parts.append(grids_html((s.get("grids") or [])[:GRID_ROWS], names, lambda rel: _data_uri(wf, join(stage, rel))))
    return "\n".join(parts)


def _hardware(manifest: dict) -> str:
    e = html.escape
    hw = manifest.get("hardware")
    rows = {f"requested: {k}": v for k, v in _flat(manifest.get("resources") or {}).items() if v not in (None, 0, {}, [])}
    rows.update(_flat(hw) if hw else {"ran on": "not recorded (a run before the report existed)"})
    return ("<h3>Hardware</h3><table class='kv hardware'>"
            + "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in rows.items()) + "</table>")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return v if isinstance(v, str) else json.dumps(v)
