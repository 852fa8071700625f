"""A prompt set's items: the prompt and what its scorers need (GenEval's metadata line, DPG-Bench's item id)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from simplear.config import ConfigError
from simplear.evaluation.config import PromptSetSpec


@dataclass(frozen=True)
class EvalItem:
    index: int  # the prompt's folder: <index:05d>/
    prompt: str
    metadata: dict = field(default_factory=dict)  # GenEval: its metadata line (tag, include, ...); DPG: {"item_id"}


def load_items(ctx, spec: PromptSetSpec, where: str) -> list[EvalItem]:
    """The set's items, in the order of their file (GenEval's indices are line numbers)."""
    if spec.source == "list":
        prompts = [(p, {}) for p in spec.items]
    elif spec.source == "demo_held_out":
        prompts = _demo_held_out(ctx, spec, where)
    else:
        path = Path(spec.path)
        if not path.is_absolute():
            path = ctx.workflow_path.parent / path
        if not path.exists():
            raise ConfigError(f"{where}.path: {path} not found")
        prompts = {"geneval": _geneval, "dpg": _dpg, "file": _text_file}[spec.source](path, where)
    if spec.max_prompts:
        prompts = prompts[: spec.max_prompts]
    if not prompts:
        raise ConfigError(f"{where}: prompt set {spec.name!r} has no prompts")
    return [EvalItem(i, p, meta) for i, (p, meta) in enumerate(prompts)]


def _demo_held_out(ctx, spec: PromptSetSpec, where: str) -> list[tuple[str, dict]]:
    from simplear.datasets import GeneratedSource, load_dataset_manifest
    from simplear.demo_captions import caption_for, held_out_combinations

    if spec.dataset not in ctx.dataset_files:
        raise ConfigError(f"{where}.dataset: {spec.dataset!r} is not among the workflow's datasets {sorted(ctx.dataset_files)}")
    ds = load_dataset_manifest(ctx.dataset_files[spec.dataset])
    if not isinstance(ds, GeneratedSource) or not getattr(ds.params, "held_out", 0):
        raise ConfigError(f"{where}.dataset: {spec.dataset!r} holds no combinations out (its params.held_out is 0)")
    return [(caption_for(fg, shape, bg), {"fg": fg, "shape": shape, "bg": bg})
            for fg, shape, bg in held_out_combinations(ds.params.held_out, ds.params.seed)]


def _geneval(path: Path, where: str) -> list[tuple[str, dict]]:
    """GenEval's evaluation_metadata.jsonl: one JSON object a line, with `prompt`, `tag` and `include`."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}.path: {path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or "tag" not in meta or "include" not in meta:
            raise ConfigError(f"{where}.path: {path} line {n} lacks GenEval's `prompt`, `tag` or `include`")
        out.append((meta["prompt"], meta))
    return out


def _dpg(path: Path, where: str) -> list[tuple[str, dict]]:
    """DPG-Bench's prompts/ folder: one `<item_id>.txt` a prompt (the id names the grid it is scored on)."""
    if not path.is_dir():
        raise ConfigError(f"{where}.path: {path} is not DPG-Bench's prompts/ folder")
    files = sorted(path.glob("*.txt"))
    return [(f.read_text(encoding="utf-8").strip(), {"item_id": f.stem}) for f in files if f.read_text(encoding="utf-8").strip()]


def _text_file(path: Path, where: str) -> list[tuple[str, dict]]:
    return [(line.strip(), {}) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
