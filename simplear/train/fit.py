"""`fit`: a training worker on Ray Train (`TorchTrainer`), checkpoints in the stage folder, the final export;
`run_training`: what every training stage does around it.

The run dir's storage is Ray Train's: `storage_path` is the stage's folder on the run dir's pyarrow filesystem
(a local path, or `bucket/prefix/<stage>` on S3), so checkpoints persist and restore wherever the run dir is.
Each checkpoint is staged on the worker's node in the staging dir (simplear.storage.staging) and deleted after
Ray Train has persisted it."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from simplear.observability.logs import ray_data_progress, train_log_level
from simplear.storage import join, open_parent
from simplear.train.config import FINAL, LEGACY_CHECKPOINTS, METRICS, OPTIMIZER, TRAINER_STATE, TrainConfig
from simplear.train.loop import train_loop
from simplear.train.metrics import parse_metrics
from simplear.train.sessions import RaySession, setup_worker_logging
from simplear.train.task import TrainTask
from simplear.train.workdir import WorkDir
from simplear.train_data import DataFile

log = logging.getLogger("simplear.train")


def loop_worker(config: dict) -> None:
    """`fit`'s default worker: the shared loop over this worker's share of the files."""
    setup_worker_logging()
    ray_data_progress(interactive=False)
    session = RaySession([DataFile(**f) for f in config["files"]], config["columns"])
    work = WorkDir.of(config["run"], config["stage"])
    train_loop(config["task"], TrainConfig.model_validate(config["train"]), session, work, config.get("run_info"))


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


def fit(task: TrainTask, cfg: TrainConfig, *, stage_dir: str | Path, resources, files: list[DataFile] = (),
        columns: list[str] = (), run_info: dict | None = None, worker=None):
    """Run `train_loop` on Ray Train; a rerun on the same stage folder resumes from its latest checkpoint.

    `stage_dir`: the stage's folder, a path or `<run dir URI>/<stage>`. `worker`: another per-worker function taking
    the same config dict (GRPO runs trl's trainer there)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    store, stage = open_parent(stage_dir)
    fs, root = store.filesystem()
    legacy, runs = join(stage, LEGACY_CHECKPOINTS), join(stage, stage)
    if any(True for _ in store.list(legacy)) and not any(True for _ in store.list(runs)):
        store.move(legacy, runs)  # a run started before the upgrade: its checkpoints resume it
        log.info("%s: moved the checkpoints of an earlier run from %s/ to %s/ (the run is now named after the stage)",
                 stage, LEGACY_CHECKPOINTS, stage)

    trainer = TorchTrainer(
        worker or loop_worker,
        train_loop_config={"task": task, "train": cfg.model_dump(mode="json"), "out_dir": str(stage_dir), "run": store.uri,
                           "stage": stage, "run_info": run_info or {}, "files": [asdict(f) for f in files],
                           "columns": list(columns)},
        scaling_config=scaling_config(resources, cfg),
        run_config=RunConfig(
            name=stage,
            storage_path=f"{root}/{stage}",
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )
    return trainer.fit()


def checkpoints_dir(stage_dir: Path) -> Path:
    """Where Ray Train keeps a stage's checkpoints: its run, named after the stage (`<stage>/<stage>/`)."""
    return Path(stage_dir) / Path(stage_dir).name


def export_final(checkpoint_dir: Path, final_dir: str | Path, exclude: tuple[str, ...] = ()) -> dict:
    """Copy a training checkpoint without its optimizer state (and the `exclude` patterns: a trainer's own resume
    files) to `final_dir` (a path or `<run dir URI>/<stage>/final`), whole; returns its trainer state."""
    from simplear.workflow.manifest import committed

    with committed(*open_parent(final_dir)) as tmp:
        shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns(OPTIMIZER, *exclude))
        return json.loads((tmp / TRAINER_STATE).read_text())


@dataclass
class TrainingRun:
    state: dict  # the final checkpoint's trainer state
    rows: list[dict]  # metrics.jsonl, one row per logged step
    metrics: dict  # what every training stage reports: steps, resumes, seconds


def run_training(ctx, task, cfg: TrainConfig, *, files: list[DataFile] = (), columns: list[str] = (), worker=None,
                 exclude: tuple[str, ...] = ()) -> TrainingRun:
    """`fit` for a stage, then its last checkpoint as final/; a run that ends short of `steps` is an error."""
    t0 = time.time()
    result = fit(task, cfg, stage_dir=ctx.store.child(ctx.name), resources=ctx.resources, files=files,
                 columns=columns, run_info={"stage": ctx.name}, worker=worker)
    if result.checkpoint is None:
        raise RuntimeError(f"{ctx.name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = export_final(Path(d), ctx.store.child(join(ctx.name, FINAL)), exclude)
    if state["step"] != cfg.steps:
        raise RuntimeError(f"{ctx.name}: the last checkpoint is at step {state['step']}, not {cfg.steps}")
    metrics = {"steps": state["step"], "resumed_at": state.get("resumed_at", []), "train_seconds": round(time.time() - t0, 1)}
    logged = ctx.store.read(join(ctx.name, METRICS))
    return TrainingRun(state, parse_metrics(logged.data.decode()) if logged else [], metrics)
