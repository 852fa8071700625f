"""Where a training worker writes its logs and figures (metrics.jsonl, TensorBoard, samples.png).

On a POSIX run dir that is the stage folder itself. On object storage it is a folder on the worker's node (the
staging dir), published to the stage's prefix at every checkpoint and at the end; a worker restarted on any node
starts from the published metrics.jsonl, which the loop cuts back to the checkpoint it resumes from.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from simplear.storage import join, open_store
from simplear.storage.staging import staging_dir
from simplear.train.config import METRICS


@dataclass
class WorkDir:
    path: Path
    run: str  # the run dir (path or URI): the `run` label of the metrics
    stage: str
    remote: bool = False
    _published: dict = field(default_factory=dict)

    @classmethod
    def of(cls, run: str, stage: str) -> "WorkDir":
        store = open_store(run)
        if store.is_local:
            return cls(store.local_root / stage, run, stage)
        path = staging_dir() / f"work-{hashlib.sha256(run.encode()).hexdigest()[:16]}" / stage
        path.mkdir(parents=True, exist_ok=True)
        published = join(stage, METRICS)
        if store.exists(published):
            store.download(published, path / METRICS)
        return cls(path, run, stage, remote=True)

    @classmethod
    def local(cls, path: str | Path) -> "WorkDir":
        path = Path(path)
        return cls(path, str(path.parent), path.name)

    def publish(self) -> None:
        """Upload what changed since the last call (each file whole, after the run's fence check)."""
        if not self.remote:
            return
        from simplear.workflow.manifest import committed

        store = open_store(self.run)
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            stat = f.stat()
            rel = str(f.relative_to(self.path))
            if self._published.get(rel) == (stat.st_size, stat.st_mtime_ns):
                continue
            with committed(store, join(self.stage, rel)) as tmp:
                shutil.copyfile(f, tmp)
            self._published[rel] = (stat.st_size, stat.st_mtime_ns)
