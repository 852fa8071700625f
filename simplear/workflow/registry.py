"""The registry of stage kinds: the engine finds a stage's code only through here.

Built-in kinds are listed by module so that importing the engine does not import torch, vLLM or
Ray Data; a stage module registers its kind with `@register_stage` when it is first asked for.
Workflows can add kinds of their own through `plugins:` (modules that call `register_stage`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from simplear import __version__
from simplear.config import StrictModel

# kind -> module that registers it
BUILTIN_STAGE_MODULES: dict[str, str] = {
    "download": "pipelines.download",
    "filter": "pipelines.filter",
    "recaption": "pipelines.recaption",
    "tokenize": "pipelines.pretokenize",
    "pretrain": "stages.pretrain",
    "sft": "stages.sft",
    "grpo": "stages.grpo",
    "serve": "stages.serve",
}


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type[StrictModel]
    run: Callable  # run(ctx: StageContext) -> StageResult | None

    @property
    def code_version(self) -> str:
        """Package version plus a hash of the module that implements the kind: editing a stage makes it stale."""
        module = inspect.getmodule(self.run)
        try:
            source = inspect.getsource(module) if module else ""
        except (OSError, TypeError):
            source = ""
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        return f"{__version__}+{digest}"


_KINDS: dict[str, StageKind] = {}


def register_stage(name: str, config: type[StrictModel]):
    """Decorator: `@register_stage("filter", FilterConfig) def run(ctx): ...`."""

    def wrap(fn: Callable) -> Callable:
        _KINDS[name] = StageKind(name=name, config=config, run=fn)
        return fn

    return wrap


def import_plugins(modules: list[str]) -> None:
    for module in modules:
        importlib.import_module(module)


def known_kinds() -> list[str]:
    return sorted(set(_KINDS) | set(BUILTIN_STAGE_MODULES))


def get_stage_kind(name: str) -> StageKind:
    if name not in _KINDS and name in BUILTIN_STAGE_MODULES:
        importlib.import_module(BUILTIN_STAGE_MODULES[name])
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r} (known: {', '.join(known_kinds()) or 'none'})") from None
