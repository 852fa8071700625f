"""A prompt set's items, one per prompt: the prompt and what its scorers need (GenEval's metadata line,
DPG-Bench's item id and questions). A prompt's position in the set names its folder (`<position:05d>/`)."""

from __future__ import annotations

import json
from pathlib import Path

from simplear.config import ConfigError
from simplear.evaluation.config import PromptSetSpec
from simplear.evaluation.protocol import DrawRequest, reference_requests
from simplear.scorers import EvalItem


def load_items(ctx, spec: PromptSetSpec, where: str) -> tuple[list[EvalItem], list[DrawRequest]]:
    """The set's items, in the order of their file (GenEval's prompt folders are its line numbers), and what the
    engine is asked for each (the prompt itself, or under `protocol` the reference run's text and negative prompt,
    decided over the whole file before `max_prompts` cuts it)."""
    if spec.source == "list":
        prompts = [(p, {}) for p in spec.items]
    elif spec.source == "demo_held_out":
        prompts = _demo_held_out(ctx, spec, where)
    else:
        path = ctx.config_path(spec.path)
        if not path.exists():
            raise ConfigError(f"{where}.path: {path} not found")
        prompts = {"geneval": _geneval, "dpg": _dpg, "file": _text_file}[spec.source](path, where)
    if not prompts:
        raise ConfigError(f"{where}: prompt set {spec.name!r} has no prompts")
    items = [p if isinstance(p, EvalItem) else EvalItem(prompt=p[0], metadata=p[1]) for p in prompts]
    requests = draw_requests(spec, items)
    n = spec.max_prompts or len(items)
    return items[:n], requests[:n]


def draw_requests(spec: PromptSetSpec, items: list[EvalItem]) -> list[DrawRequest]:
    if spec.protocol is None:
        return [DrawRequest(it.prompt) for it in items]
    # the reference reads GenEval's `reprompt` where a line has one, and DPG-Bench's prompt files by name
    texts = [it.metadata.get("reprompt") or it.prompt for it in items]
    order = sorted(range(len(items)), key=lambda i: f"{items[i].id}.txt") if spec.source == "dpg" else range(len(items))
    drawn = reference_requests([texts[i] for i in order], spec.protocol)
    out: list[DrawRequest] = [None] * len(items)  # type: ignore[list-item]
    for request, i in zip(drawn, order):
        out[i] = request
    return out


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


def _dpg(path: Path, where: str) -> list[EvalItem]:
    """DPG-Bench's dpg_bench.csv: its prompts (`text`) with their questions; the item id names the grid."""
    from simplear.scorers.dpg import load_items as dpg_items

    try:
        return dpg_items(path)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{where}.path: {e}") from None


def _text_file(path: Path, where: str) -> list[tuple[str, dict]]:
    return [(line.strip(), {}) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
