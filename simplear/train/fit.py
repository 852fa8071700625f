"""`fit`: `train_loop` on Ray Train (`TorchTrainer`), checkpoints in the stage folder, the final export."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from simplear.train.config import LEGACY_CHECKPOINTS, OPTIMIZER, TRAINER_STATE, TrainConfig
from simplear.train.loop import train_loop
from simplear.train.sessions import RaySession
from simplear.train.task import TrainTask
from simplear.train_data import DataFile

log = logging.getLogger("simplear.train")


def _ray_worker(config: dict) -> None:
    import ray.data

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("simplear").setLevel(logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False
    session = RaySession([DataFile(**f) for f in config["files"]], config["columns"])
    train_loop(config["task"], TrainConfig.model_validate(config["train"]), session, config["out_dir"], config.get("run_info"))


def scaling_config(resources, cfg: TrainConfig):
    """The stage's `resources` (per worker, `concurrency` workers) as Ray Train's ScalingConfig."""
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": resources.cpus}
    if resources.gpus:
        per_worker["GPU"] = resources.gpus
    if resources.memory:
        per_worker["memory"] = int(resources.memory)
    cfg.micro_batch_size(resources.concurrency)  # fail before any work on a batch that does not split
    return ScalingConfig(num_workers=resources.concurrency, use_gpu=resources.gpus > 0, resources_per_worker=per_worker)


def fit(task: TrainTask, cfg: TrainConfig, *, stage_dir: Path, resources, files: list[DataFile] = (), columns: list[str] = (),
        run_info: dict | None = None, worker=None):
    """Run `train_loop` on Ray Train; a rerun on the same stage folder resumes from its latest checkpoint.

    `worker`: another per-worker function taking the same config dict (GRPO runs trl's trainer there)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    runs = checkpoints_dir(stage_dir)
    legacy = stage_dir / LEGACY_CHECKPOINTS
    if legacy.is_dir() and not runs.exists():  # a run started before the upgrade: its checkpoints resume it
        os.rename(legacy, runs)
        log.info("%s: moved the checkpoints of an earlier run from %s/ to %s/ (the run is now named after the stage)",
                 stage_dir.name, LEGACY_CHECKPOINTS, runs.name)

    trainer = TorchTrainer(
        worker or _ray_worker,
        train_loop_config={"task": task, "train": cfg.model_dump(mode="json"), "out_dir": str(stage_dir), "run_info": run_info or {},
                           "files": [asdict(f) for f in files], "columns": list(columns)},
        scaling_config=scaling_config(resources, cfg),
        run_config=RunConfig(
            name=runs.name,
            storage_path=str(stage_dir),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    return trainer.fit()


def checkpoints_dir(stage_dir: Path) -> Path:
    """Where Ray Train keeps a stage's checkpoints: its run, named after the stage (`<stage>/<stage>/`)."""
    return Path(stage_dir) / Path(stage_dir).name


def export_final(checkpoint_dir: Path, final_dir: Path) -> dict:
    """Copy a training checkpoint without its optimizer state to `final_dir` (atomically); returns its trainer state."""
    from simplear.workflow.manifest import atomic_path

    with atomic_path(final_dir) as tmp:
        shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns(OPTIMIZER))
    return json.loads((final_dir / TRAINER_STATE).read_text())
