"""What a stage sees (`StageContext`) and what it hands back (`StageResult`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simplear.config import StrictModel
from simplear.storage import Store, join, open_store
from simplear.workflow.manifest import MANIFEST, committed
from simplear.workflow.spec import Resources


@dataclass
class StageResult:
    """`outputs`: relative paths to record in the manifest (default: every file the stage wrote).
    `files`: manifest entries the writing tasks already computed, by relative path (not re-read).
    `artifacts`: the paths a person opens (samples.png, final/, endpoint.json), shown by `status`."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None
    files: dict[str, dict] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)


@dataclass
class StageContext:
    """Everything a stage needs, picklable so the stage can run as a Ray task anywhere in the cluster.

    `stage_dir` and `run_dir` are folders only for a run dir on a POSIX file system (None on object storage);
    what works on every storage goes through `store`, `output`, `has_output` and `input_files`."""

    name: str
    kind: str
    config: StrictModel
    resources: Resources
    stage_dir: Path | None
    run_dir: Path | None
    needs: list[str]
    fingerprint: str
    dataset_files: dict[str, Path]
    workflow_path: Path
    profile: str
    fingerprint_parts: dict = field(default_factory=dict)  # what the fingerprint hashes (kept in the manifest)
    interactive: bool = False  # the driver writes to a terminal: progress bars; else a progress line every interval
    progress_interval_s: float = 30.0
    run_uri: str | None = None  # the run dir as a path or URI (default: run_dir)

    @property
    def store(self) -> Store:
        return open_store(self.run_uri or self.run_dir)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"simplear.stage.{self.name}")

    def config_path(self, value: str) -> Path:
        """A path the stage's config gives: absolute, or relative to workflow.yaml (not to where the run started)."""
        path = Path(value)
        return path if path.is_absolute() else self.workflow_path.parent / path

    def _check_need(self, need: str) -> None:
        if need not in self.needs:
            raise KeyError(f"stage {self.name!r} does not need {need!r} (needs: {self.needs})")

    def input_manifest(self, need: str) -> dict:
        self._check_need(need)
        manifest = self.store.read_json(join(need, MANIFEST))
        if manifest is None:
            raise FileNotFoundError(f"stage {self.name!r}: input stage {need!r} has no manifest: run it first")
        return manifest

    def input_files(self, need: str, suffix: str = ".parquet") -> list:
        """The files an input stage recorded in its manifest, so half-written leftovers are never read: Paths on a
        POSIX run dir, paths on `filesystem` on object storage (pyarrow and Ray Data take both with
        `filesystem=ctx.filesystem`)."""
        return [self.input_path(need, o["path"]) for o in self.input_manifest(need)["outputs"] if o["path"].endswith(suffix)]

    def input_path(self, need: str, rel: str):
        """One file of an input stage, as `input_files` gives it."""
        self._check_need(need)
        fs, root = self.store.filesystem()
        return Path(root) / need / rel if fs is None else f"{root}/{need}/{rel}"

    @property
    def filesystem(self):
        """The pyarrow filesystem of the run dir (None: the local one)."""
        return self.store.filesystem()[0]

    def key(self, rel: str) -> str:
        return join(self.name, rel)

    def has_output(self, rel: str) -> bool:
        return self.store.exists(self.key(rel))

    def output(self, rel: str):
        """`with ctx.output("shards/00001.parquet") as tmp:` write to tmp; it appears under the stage folder whole."""
        return committed(self.store, self.key(rel))
