"""What a training worker needs from its surroundings: a Ray Train worker (`RaySession`) or one plain process
(`LocalSession`), and what every worker does alike — its logging, when to report, how a checkpoint is reported."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from simplear.observability.logs import quiet_libraries
from simplear.train_data import DataFile, WorkerRows


class RaySession:
    """Inside a Ray Train worker: its rows of the data files, the latest checkpoint, reports."""

    def __init__(self, files: list[DataFile] = (), columns: list[str] = ()):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.files, self.columns = list(files), list(columns)

    def worker_rows(self, seed: int, shuffle_buffer: int) -> WorkerRows:
        return WorkerRows(self.files, self.columns, self.rank, self.world_size, seed, shuffle_buffer)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        ray_report(metrics, checkpoint_dir, name)


def ray_report(metrics: dict, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
    """`ray.train.report`; a checkpoint is committed only while this run still holds its run dir (the fence)."""
    import ray.train

    from simplear.workflow.lock import check_fence

    if checkpoint_dir is None:
        ray.train.report(metrics)
    else:
        check_fence()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_dir_name=name)


class LocalSession:
    """The same loop in one process (as rank 0 of 1): checkpoints under `storage_dir`."""

    def __init__(self, files: list[Path], columns: list[str], storage_dir: Path, device: str = "cpu", keep: int | None = 2):
        import pyarrow.parquet as pq
        import torch

        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.files = [DataFile(str(f), pq.ParquetFile(f).metadata.num_rows) for f in files]
        self.columns = columns
        self.storage_dir = Path(storage_dir)
        self.keep = keep
        self.reports: list[dict] = []

    def worker_rows(self, seed: int, shuffle_buffer: int) -> WorkerRows:
        return WorkerRows(self.files, self.columns, 0, 1, seed, shuffle_buffer)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.storage_dir.glob("checkpoint-*") if p.is_dir())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        from simplear.workflow.manifest import atomic_path

        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            with atomic_path(self.storage_dir / name) as tmp:
                shutil.copytree(checkpoint_dir, tmp)
            for old in self.checkpoints()[: -self.keep] if self.keep else []:
                shutil.rmtree(old)


def setup_worker_logging() -> None:
    """A Ray worker process has no handler of its own: the project's INFO lines go to the worker's log."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("simplear").setLevel(logging.INFO)
    quiet_libraries()


class ReportClock:
    """When to send metrics to Ray Train: at most every `interval_s`, by rank 0's clock, because every worker must
    call `ray.train.report` on the same steps. `vote()` can ride on a collective the caller runs anyway (the loop's
    all-reduce); `due()` runs its own broadcast (the GRPO callback has none)."""

    def __init__(self, interval_s: float, rank: int):
        self.interval_s, self.rank = interval_s, rank
        self.reset()

    def reset(self) -> None:
        self.last = time.perf_counter()

    def vote(self) -> float:
        return float(self.rank == 0 and time.perf_counter() - self.last >= self.interval_s)

    def decide(self, votes: float) -> bool:
        if votes > 0:
            self.reset()
        return votes > 0

    def due(self, device) -> bool:
        import torch
        import torch.distributed as dist

        vote = torch.tensor([self.vote()], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(vote, src=0)
        return self.decide(vote.item())


def report_checkpoint(session, metrics: dict, name: str, write: Callable[[Path], None]) -> None:
    """Every worker reports (Ray Train waits for all of them); rank 0 writes the folder with `write(dir)`, in the
    node's staging dir (never the system temp folder: a 0.5B checkpoint with AdamW state is ~6.6 GB), which Ray Train
    persists into the run before the folder is deleted, so the stage folder only ever holds committed checkpoints."""
    from simplear.storage.staging import staging_dir

    if session.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=staging_dir()) as tmp:
        d = Path(tmp) / name
        write(d)
        session.report(metrics, d, name)
