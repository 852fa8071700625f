"""`workflow.yaml`: typed, profile-resolved and validated as a whole before any work starts.

A file has a base (`run_dir`, `datasets`, `stages`, `ray`, `plugins`) and `profiles` whose
contents are deep-merged over the base (`null` removes a key, e.g. a stage a profile does not run).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ByteSize, Field, ValidationError, field_validator

from simplear.config import ConfigError, StrictModel, describe_validation_error
from simplear.workflow.lock import LockSettings
from simplear.workflow.names import check_name
from simplear.workflow.registry import StageKind, get_stage_kind, import_plugins

if TYPE_CHECKING:
    from simplear.storage import Store


class Resources(StrictModel):
    """What one worker of a stage asks Ray for; `concurrency` is how many such workers run at once."""

    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory: ByteSize | None = None
    concurrency: int = Field(1, ge=1)

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            opts["memory"] = int(self.memory)
        return opts


class StageSpec(StrictModel):
    uses: str
    needs: list[str] = []
    config: dict[str, Any] = {}
    resources: Resources = Resources()


class RaySettings(StrictModel):
    """How a run finds Ray: `address` (or RAY_ADDRESS, set under `ray job submit`) attaches; otherwise an embedded Ray starts."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    include_dashboard: bool | None = None
    object_store_memory: ByteSize | None = None


class WorkflowBody(StrictModel):
    run_dir: str = "runs/default"
    datasets_dir: str = "datasets_manifest"
    datasets: list[str] = []
    plugins: list[str] = []
    ray: RaySettings = RaySettings()
    lock: LockSettings = LockSettings()
    keep_previous: bool = Field(True, description="move a rerun stage's old outputs to <stage>/.previous/ (false: delete them)")
    progress_interval_s: float = Field(30.0, gt=0, description="seconds between progress lines in logs (no terminal)")
    stages: dict[str, StageSpec]

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, value: str) -> str:
        return check_run_dir(value)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:  # a stage's name is its folder under run_dir
            check_name(name, "stage name")
        return stages

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, names: list[str]) -> list[str]:
        for name in names:
            check_name(name, "dataset name")
        return names


def check_run_dir(value: str) -> str:
    """A path, or a URI of a supported object store (s3://); any other scheme is refused, never turned into a local
    folder named after it."""
    from simplear.storage import check_uri, is_uri

    return check_uri(value) if is_uri(value) else value


@dataclass
class ResolvedStage:
    name: str
    spec: StageSpec
    kind: StageKind
    config: StrictModel

    @property
    def needs(self) -> list[str]:
        return self.spec.needs

    @property
    def resources(self) -> Resources:
        return self.spec.resources


@dataclass
class ResolvedWorkflow:
    path: Path
    profile: str
    body: WorkflowBody
    stages: dict[str, ResolvedStage]  # in topological order
    dataset_files: dict[str, Path] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def run_uri(self) -> str:
        """The run dir as the user means it: an absolute path (relative ones are to workflow.yaml) or a URI."""
        from simplear.storage import is_uri

        return self.body.run_dir if is_uri(self.body.run_dir) else str((self.base_dir / self.body.run_dir).resolve())

    @cached_property
    def store(self) -> Store:
        from simplear.storage import open_store

        return open_store(self.run_uri)

    @property
    def run_dir(self) -> Path:
        """The run dir as a folder of this node; only for a run dir on a POSIX file system (see `store`)."""
        return self.store.local_root

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def downstream(self, name: str) -> list[str]:
        """`name` and every stage that depends on it, in run order."""
        hit = {name}
        for stage in self.stages.values():
            if hit.intersection(stage.needs):
                hit.add(stage.name)
        return [s for s in self.stages if s in hit]


def deep_merge(base: Any, override: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = deep_merge(out.get(key), value) if key in out else copy.deepcopy(value)
    return out


def _toposort(stages: dict[str, StageSpec]) -> tuple[list[str], list[str]]:
    """Order stages so each follows its needs; returns (order, problems)."""
    problems = []
    for name, spec in stages.items():
        for need in spec.needs:
            if need not in stages:
                problems.append(f"stages.{name}.needs: unknown stage {need!r}")
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            problems.append(f"stages: cycle {' -> '.join(cycle)}")
            return
        state[name] = 1
        for need in stages[name].needs:
            if need in stages:
                visit(need, path + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order, problems


def load_workflow(path: str | os.PathLike, profile: str | None = None) -> ResolvedWorkflow:
    """Read, resolve one profile and validate everything; raises ConfigError listing every problem."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: workflow file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")

    profiles = raw.pop("profiles", None) or {}
    default_profile = raw.pop("default_profile", "demo" if "demo" in profiles else None)
    profile = profile or default_profile
    where = f"{path}" + (f" (profile {profile})" if profile else "")
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: profiles: unknown profile {profile!r} (known: {', '.join(profiles) or 'none'})")
        if not isinstance(profiles[profile], dict):
            raise ConfigError(f"{path}: profiles.{profile}: must be a mapping")
        raw = deep_merge(raw, profiles[profile])

    try:
        body = WorkflowBody.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}:\n  " + "\n  ".join(describe_validation_error(e))) from None

    problems: list[str] = []
    if body.plugins:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        try:
            import_plugins(body.plugins)
        except ImportError as e:
            problems.append(f"plugins: cannot import: {e}")

    datasets_dir = (path.parent / body.datasets_dir).resolve()
    dataset_files: dict[str, Path] = {}
    for i, name in enumerate(body.datasets):
        file = datasets_dir / f"{name}.yaml"
        if file.is_file():
            dataset_files[name] = file
        else:
            known = sorted(p.stem for p in datasets_dir.glob("*.yaml"))
            problems.append(f"datasets.{i}: unknown dataset {name!r} (no {file}; known: {', '.join(known) or 'none'})")

    order, dag_problems = _toposort(body.stages)
    problems += dag_problems

    context = {"datasets": dataset_files, "workflow_dir": path.parent}
    resolved: dict[str, ResolvedStage] = {}
    for name in order:
        spec = body.stages[name]
        try:
            kind = get_stage_kind(spec.uses)
        except KeyError as e:
            problems.append(f"stages.{name}.uses: {e.args[0]}")
            continue
        try:
            config = kind.config.model_validate(spec.config, context=context)
        except ValidationError as e:
            problems += describe_validation_error(e, prefix=f"stages.{name}.config")
            continue
        resolved[name] = ResolvedStage(name=name, spec=spec, kind=kind, config=config)

    if problems:
        raise ConfigError(f"{where}:\n  " + "\n  ".join(problems))
    return ResolvedWorkflow(path=path, profile=profile or "", body=body, stages=resolved, dataset_files=dataset_files)
