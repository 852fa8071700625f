"""What a stage sees (`StageContext`) and what it hands back (`StageResult`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simplear.config import StrictModel
from simplear.workflow.manifest import MANIFEST, atomic_path, read_json
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
    """Everything a stage needs, picklable so the stage can run as a Ray task anywhere in the cluster."""

    name: str
    kind: str
    config: StrictModel
    resources: Resources
    stage_dir: Path
    run_dir: Path
    needs: list[str]
    fingerprint: str
    dataset_files: dict[str, Path]
    workflow_path: Path
    profile: str
    fingerprint_parts: dict = field(default_factory=dict)  # what the fingerprint hashes (kept in the manifest)
    interactive: bool = False  # the driver writes to a terminal: progress bars; else a progress line every interval
    progress_interval_s: float = 30.0

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"simplear.stage.{self.name}")

    def config_path(self, value: str) -> Path:
        """A path the stage's config gives: absolute, or relative to workflow.yaml (not to where the run started)."""
        path = Path(value)
        return path if path.is_absolute() else self.workflow_path.parent / path

    def input_dir(self, need: str) -> Path:
        if need not in self.needs:
            raise KeyError(f"stage {self.name!r} does not need {need!r} (needs: {self.needs})")
        return self.run_dir / need

    def input_manifest(self, need: str) -> dict:
        manifest = read_json(self.input_dir(need) / MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"stage {self.name!r}: input stage {need!r} has no manifest: run it first")
        return manifest

    def input_files(self, need: str, suffix: str = ".parquet") -> list[Path]:
        """The files an input stage recorded in its manifest, so half-written leftovers are never read."""
        base = self.input_dir(need)
        return [base / o["path"] for o in self.input_manifest(need)["outputs"] if o["path"].endswith(suffix)]

    def output(self, rel: str):
        """`with ctx.output("shards/00001.parquet") as tmp:` write to tmp; it appears under the stage folder whole."""
        return atomic_path(self.stage_dir / rel)
