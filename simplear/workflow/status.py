"""The state of every stage of a run dir, read from disk: done, stale (and why), running, partial, failed, pending.

Manifests written before fingerprint SCHEME 2 are re-fingerprinted here (in memory; a run writes them
back) from the config and inputs they recorded, once their old fingerprint is checked to still match
those inputs: upgrading does not make a finished run stale.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from simplear.workflow.fingerprint import (
    SCHEME,
    datasets_used,
    fingerprint_of,
    fingerprint_parts,
    legacy_fingerprint,
    source_changes,
    stale_reasons,
)
from simplear.workflow.lock import read_lock
from simplear.storage import join
from simplear.workflow.manifest import FAILED, MANIFEST, STARTED
from simplear.workflow.spec import ResolvedStage, ResolvedWorkflow


@dataclass
class StageStatus:
    name: str
    state: str  # done | stale | running | partial | failed | pending
    fingerprint: str | None  # what it would run with now (None while an input is not done)
    parts: dict | None
    manifest: dict | None
    failure: dict | None
    started: dict | None = None
    reasons: list[str] = field(default_factory=list)  # why stale
    notes: list[str] = field(default_factory=list)
    progress: str | None = None
    migrated: bool = False  # the manifest was re-fingerprinted from the old scheme and needs writing back
    refresh: bool = False  # stale only because source files outside the run changed: rerun in place

    @property
    def rows(self) -> int | None:
        return self.manifest.get("rows") if self.manifest else None

    @property
    def duration_s(self) -> float | None:
        return self.manifest.get("duration_s") if self.manifest else None

    @property
    def rows_kept_rejected(self) -> tuple[int, int] | None:
        return kept_rejected(self.manifest) if self.manifest else None


def kept_rejected(manifest: dict) -> tuple[int, int] | None:
    outs = [o for o in manifest["outputs"] if o.get("rows") is not None]
    if not outs:
        return None
    rejected = sum(o["rows"] for o in outs if o["path"].startswith("rejected/"))
    return sum(o["rows"] for o in outs) - rejected, rejected


def headline(manifest: dict) -> str:
    """A finished stage's key figures on one line (the console's `done` line, the report's table): rows kept and
    rejected (top reasons), rate; steps, loss or reward from start to end, tokens/s; scores; the endpoint."""
    m = manifest.get("metrics") or {}
    bits = []
    kr = kept_rejected(manifest)
    if kr and kr[1]:
        reasons = sorted((m.get("by_reason") or {}).items(), key=lambda x: -x[1])
        top = ", ".join(f"{r} {n:,}" for r, n in reasons[:3]) + (", ..." if len(reasons) > 3 else "")
        bits.append(f"{kr[0]:,} rows kept, {kr[1]:,} rejected" + (f" ({top})" if top else ""))
    elif kr:
        bits.append(f"{kr[0]:,} rows")
    if m.get("rows_per_s"):
        bits.append(f"{m['rows_per_s']:,.1f} rows/s")
    if m.get("steps"):
        bits.append(f"{m['steps']} steps")
    for key in ("loss", "reward_mean", "kl"):
        if isinstance(m.get(f"{key}_start"), (int, float)) and isinstance(m.get(f"{key}_end"), (int, float)):
            bits.append(f"{key} {m[f'{key}_start']:.3g} -> {m[f'{key}_end']:.3g}")
    if m.get("tokens_per_s"):
        bits.append(f"{m['tokens_per_s']:,.0f} tokens/s")
    if manifest.get("kind") == "eval":
        bits += [f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float)]
    if isinstance(m.get("url"), str):
        bits.append(f"serving at {m['url']}")
    return "; ".join(bits)


def config_dump(config) -> dict:
    """What of a config the fingerprint covers: the values that differ from the fields' defaults, so a release
    that adds a config key (its default keeping today's behaviour) leaves finished stages done. A release
    that changes what a default means bumps the kind's `version`."""
    return config.model_dump(mode="json", exclude_defaults=True)


def current_parts(wf: ResolvedWorkflow, stage: ResolvedStage, config: dict, inputs: dict[str, dict]) -> dict:
    kind = stage.kind
    return fingerprint_parts(kind.name, kind.version, config, kind.operational, inputs, datasets_used(wf.dataset_files, config))


def _migrate(wf: ResolvedWorkflow, stage: ResolvedStage, manifest: dict, upstream: dict[str, dict]) -> tuple[dict | None, str]:
    """A SCHEME-2 manifest for one written before, or (None, why it cannot be kept)."""
    recorded = manifest.get("config")
    if recorded is None or "code_version" not in manifest:
        return None, "its manifest (written by an older simplear) records no config"
    legacy_inputs = {n: {**m, "fingerprint": m.get("legacy_fingerprint", m["fingerprint"])} for n, m in upstream.items()}
    old = legacy_fingerprint(stage.kind.name, recorded, manifest["code_version"], legacy_inputs,
                             datasets_used(wf.dataset_files, recorded))
    if old != manifest.get("fingerprint"):
        return None, "written by an older simplear, and its inputs or datasets changed since it ran"
    try:  # the recorded config as today's config model reads it (fields added since get their defaults)
        config = stage.kind.config.model_validate(recorded, context={"datasets": wf.dataset_files, "workflow_dir": wf.base_dir})
    except ValidationError as e:
        return None, f"its recorded config is not valid today: {e.errors()[0]['msg']}"
    parts = current_parts(wf, stage, config_dump(config), upstream)
    return {**manifest, "scheme": SCHEME, "fingerprint": fingerprint_of(parts), "fingerprint_parts": parts,
            "legacy_fingerprint": old, "migrated_at": time.time()}, ""


def _source_changes(wf: ResolvedWorkflow, stage: ResolvedStage, manifest: dict) -> list[str]:
    recorded = manifest.get("sources")
    if recorded is None or stage.kind.sources is None:
        return []
    return source_changes(recorded, stage.kind.sources(stage.config, wf.dataset_files))


def stage_status(wf: ResolvedWorkflow, name: str, upstream: dict[str, StageStatus], lock: tuple[dict | None, bool]) -> StageStatus:
    stage = wf.stages[name]
    manifest = wf.store.read_json(join(name, MANIFEST))
    failure = wf.store.read_json(join(name, FAILED))
    started = wf.store.read_json(join(name, STARTED))
    fp = parts = None
    not_done = [n for n in stage.needs if upstream[n].state != "done"]
    if not not_done:
        parts = current_parts(wf, stage, config_dump(stage.config), {n: upstream[n].manifest for n in stage.needs})
        fp = fingerprint_of(parts)
    st = StageStatus(name, "pending", fp, parts, manifest, failure, started)
    holder, alive = lock
    if manifest is not None and manifest.get("scheme") != SCHEME:
        migrated, why = _migrate(wf, stage, manifest, {n: upstream[n].manifest for n in stage.needs}) if not not_done else (None, "")
        if migrated is None:
            st.reasons.append(why or f"input {not_done[0]} is {upstream[not_done[0]].state}")
        else:
            st.manifest, st.migrated = migrated, True
    if st.manifest is not None:
        if st.reasons:
            st.state = "stale"
        elif not_done:
            st.state, st.reasons = "stale", [f"input {n} is {upstream[n].state}" for n in not_done]
        elif st.manifest.get("fingerprint") == fp:
            st.state = "done"
            changed = _source_changes(wf, stage, st.manifest)
            if changed:
                st.state, st.reasons, st.refresh = "stale", changed, True
        else:
            st.state, st.reasons = "stale", stale_reasons(st.manifest.get("fingerprint_parts"), parts)
        if st.state == "done" and st.manifest.get("code_version") != stage.kind.code_version:
            st.notes.append(f"code changed since it ran (kept; `--force {name}` reruns it)")
    elif alive and name in (holder or {}).get("running", []):
        st.state = "running"
    elif failure:
        st.state = "failed"
    elif started:
        st.state = "partial"
        if started.get("fingerprint") != fp and started.get("scheme") == SCHEME:
            st.notes.append("its partial outputs are for another configuration: a run moves them aside")
    if st.state in ("running", "partial", "failed") and stage.kind.progress is not None:
        st.progress = stage.kind.progress(wf.store.child(name))
    return st


def workflow_status(wf: ResolvedWorkflow) -> dict[str, StageStatus]:
    lock = read_lock(wf.store, wf.body.lock)
    statuses: dict[str, StageStatus] = {}
    for name in wf.stages:
        statuses[name] = stage_status(wf, name, statuses, lock)
    return statuses


def stage_note(st: StageStatus) -> str:
    bits = []
    if st.state == "stale":
        bits.append("; ".join(st.reasons[:3]) + (f" (+{len(st.reasons) - 3} more)" if len(st.reasons) > 3 else ""))
    if st.state == "failed" and st.failure:
        bits.append(str(st.failure.get("error", "")).splitlines()[0][:160] if st.failure.get("error") else "")
    if st.progress:
        bits.append(st.progress)
    return "; ".join(b for b in bits + st.notes if b)


def _rows(st: StageStatus) -> str:
    kr = st.rows_kept_rejected
    if kr is None:
        return ""
    kept, rejected = kr
    return f"{kept} / {rejected}" if rejected else str(kept)


def artifacts(wf: ResolvedWorkflow, st: StageStatus) -> list[str]:
    """The paths a person opens, relative to the run dir, for stages that have them."""
    if not st.manifest:
        return []
    return [join(st.name, a) for a in st.manifest.get("artifacts", []) if any(True for _ in wf.store.list(join(st.name, a)))]


def format_status(wf: ResolvedWorkflow, statuses: dict[str, StageStatus]) -> str:
    header = ("stage", "state", "rows kept / rejected", "duration_s", "note")
    rows = [header]
    for name, st in statuses.items():
        duration = "" if st.duration_s is None else f"{st.duration_s:.1f}"
        rows.append((name, st.state, _rows(st), duration, stage_note(st)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    opened = [(n, artifacts(wf, st)) for n, st in statuses.items()]
    if any(paths for _, paths in opened):
        lines += ["", f"open (under {wf.run_uri}):"] + [f"  {p}" for _, paths in opened for p in paths]
    return "\n".join(lines)


def status_json(wf: ResolvedWorkflow, statuses: dict[str, StageStatus]) -> str:
    out: dict[str, Any] = {}
    for n, st in statuses.items():
        kr = st.rows_kept_rejected
        out[n] = {
            "state": st.state, "rows": st.rows, "rows_kept": kr[0] if kr else None, "rows_rejected": kr[1] if kr else None,
            "duration_s": st.duration_s, "reasons": st.reasons, "notes": st.notes, "progress": st.progress,
            "error": (st.failure or {}).get("error") if st.state == "failed" else None,
            "artifacts": artifacts(wf, st),
        }
    return json.dumps({"run_dir": wf.run_uri, "stages": out}, indent=2)
