"""The registry of stage kinds: the engine finds a stage's code only through here.

Built-in kinds are listed by module so that importing the engine does not import torch, vLLM or
Ray Data; a stage module registers its kind with `@register_stage` when it is first asked for.
Workflows can add kinds of their own through `plugins:` (modules that call `register_stage`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    "eval": "stages.eval",
}


@dataclass(frozen=True)
class StageKind:
    """A stage kind: its config, its body and what decides whether its outputs are still valid.

    `version` is bumped by hand when the meaning of the kind's outputs changes; `operational` lists
    the config keys (dotted paths) that change only speed, memory or logging, never outputs, so that
    changing them (a smaller batch after an out-of-memory crash) keeps the work done. `progress`
    reads how far a running or interrupted stage got (rows, step), for `status`, from its folder's location
    (`<run dir>/<stage>`, a path or a URI: read it with `simplear.storage.open_parent`).
    `sources(config, dataset_files)` lists the files outside the run the stage reads ({path: [bytes,
    mtime_ns]}, e.g. archives); when they change, a done stage is *refreshed*: run again in place, its
    outputs kept, so it redoes only what its own receipts say changed. `object_store`: the kind reads and
    writes the run dir only through the storage-neutral context (ctx.output, ctx.input_files, ctx.store), so it
    runs where the run dir is object storage too.
    """

    name: str
    config: type[StrictModel]
    run: Callable  # run(ctx: StageContext) -> StageResult | None
    version: int = 1
    operational: frozenset[str] = frozenset()
    progress: Callable[[str], str | None] | None = None
    sources: Callable[[Any, dict], dict[str, list]] | None = None
    object_store: bool = False

    @property
    def code_version(self) -> str:
        """Package version plus a hash of the kind's module and the project modules it imports.

        Recorded in the manifest and reported by `status` ("code changed since it ran"); never by
        itself a reason to throw outputs away: that is what `version` is for.
        """
        module = inspect.getmodule(self.run)
        digest = hashlib.sha256()
        for name, source in sorted(_project_sources(module.__name__).items()) if module else []:
            digest.update(f"{name}\n{source}".encode())
        return f"{__version__}+{digest.hexdigest()[:16]}"


ENGINE_MODULES = ("simplear.workflow", "simplear.config")


def _project_sources(root: str) -> dict[str, str]:
    """Sources of `root` and, transitively, of the modules of its own top-level package or ours that it imports."""
    packages = {root.split(".")[0], "simplear", "pipelines", "stages"}
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(ENGINE_MODULES):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError):  # `pkg.mod.attr`: an attribute, not a module
            continue
        if spec is None:
            continue
        origin = spec.origin
        if origin is None:  # a package an import hook sees as a namespace: its __init__.py is still on disk
            inits = [Path(p) / "__init__.py" for p in spec.submodule_search_locations or []]
            origin = next((str(f) for f in inits if f.is_file()), None)
        if not origin or not origin.endswith(".py"):
            continue
        try:
            source = Path(origin).read_text()
        except OSError:  # moved or deleted since it was imported (code upgraded under a running driver)
            continue
        seen[name] = source
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in packages]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in packages:
                    # `from pkg import mod` may name a submodule or an attribute: try both
                    todo.append(node.module)
                    todo += [f"{node.module}.{a.name}" for a in node.names]
    return seen


_KINDS: dict[str, StageKind] = {}


def register_stage(name: str, config: type[StrictModel], *, version: int = 1, operational: tuple[str, ...] = (),
                   progress: Callable[[str], str | None] | None = None,
                   sources: Callable[[Any, dict], dict[str, list]] | None = None, object_store: bool = False):
    """Decorator: `@register_stage("filter", FilterConfig, version=1, operational=("batch_size",)) def run(ctx): ...`."""
    unknown = [key for key in operational if not _config_has(config, key)]
    if unknown:
        raise ValueError(f"stage kind {name!r}: operational keys {unknown} are not fields of {config.__name__}")

    def wrap(fn: Callable) -> Callable:
        _KINDS[name] = StageKind(name=name, config=config, run=fn, version=version, operational=frozenset(operational),
                                 progress=progress, sources=sources, object_store=object_store)
        return fn

    return wrap


def _config_has(model: type, dotted: str) -> bool:
    """Whether `a.b.c` names a field path through nested config models (optional ones included)."""
    import typing

    head, _, rest = dotted.partition(".")
    fields = getattr(model, "model_fields", {})
    if head not in fields:
        return False
    if not rest:
        return True
    annotation = fields[head].annotation
    candidates = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
    return any(isinstance(c, type) and issubclass(c, StrictModel) and _config_has(c, rest) for c in candidates)


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
