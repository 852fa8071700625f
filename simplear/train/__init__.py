"""The training layer of the project: pretrain and SFT are this loop plus their hooks; GRPO runs trl's
trainer as another worker of the same `fit` (`simplear.grpo`) and shares everything around the loop:
the session (worker logging, report cadence, checkpoint reporting), the checkpoint layout and final
export (`run_training`), the metrics rows and summary, and the figures.

A stage hands `fit()` a `TrainTask` (the hooks: build the model, turn data rows into micro-batches,
compute the loss, save a checkpoint, finish with samples), a `TrainConfig` and its Parquet files with
their row counts; `fit` runs `train_loop` on every Ray Train worker (`TorchTrainer`, DDP or FSDP2
across workers), and each worker reads its own share of the files (`simplear.train_data`).
What a run leaves under the stage folder:

    <stage>/checkpoint-00000100/       every `checkpoint_every` steps: HF layout + optimizer.pt + trainer_state.json
                                       (the Ray Train run, named after the stage for the dashboard)
    final/                             the last checkpoint without optimizer state: the stage's output
    metrics.jsonl, tensorboard/        loss, image-token loss, lr, grad norm, tokens/s per step (rank 0)
    samples.png, loss_curve.png        the end-of-stage sample grid and loss curve

Resume: Ray Train V2 has no `resume_from_checkpoint`; a rerun with the same `RunConfig(name,
storage_path)` makes `ray.train.get_checkpoint()` return the latest reported checkpoint, from which the
loop restores weights, optimizer state, step and every worker's data position (epoch, file and row
reached, the rows in its shuffle buffer), so a killed run ends at the same step, on the same batches,
as an uninterrupted one, with one worker or several. `FailureConfig` restarts failed workers the
same way within one run. A resume with another number of workers refuses: the files are shared out by rank.

`LocalSession` runs the same loop in one process without Ray (the benchmark's baseline, fast tests).
"""

from __future__ import annotations

from simplear.train.config import (FINAL, LEGACY_CHECKPOINTS, LOSS_CURVE, METRICS, OPTIMIZER, SAMPLES, TENSORBOARD,
                                   TRAIN_OPERATIONAL, TRAINER_STATE, TrainConfig, lr_at)
from simplear.train.figures import Panel, plot_curves, plot_loss_curve
from simplear.train.fit import TrainingRun, checkpoints_dir, export_final, fit, run_training, scaling_config
from simplear.train.loop import train_loop
from simplear.train.metrics import MetricsWriter, read_metrics, summarize
from simplear.train.sessions import LocalSession, RaySession, ReportClock, ray_report, report_checkpoint, setup_worker_logging
from simplear.train.task import Bundle, TrainTask


__all__ = ["Bundle", "FINAL", "LEGACY_CHECKPOINTS", "LOSS_CURVE", "LocalSession", "METRICS", "MetricsWriter", "OPTIMIZER", "Panel", "RaySession", "ReportClock", "SAMPLES", "TENSORBOARD", "TRAINER_STATE", "TRAIN_OPERATIONAL", "TrainConfig", "TrainTask", "TrainingRun", "checkpoints_dir", "export_final", "fit", "lr_at", "plot_curves", "plot_loss_curve", "ray_report", "read_metrics", "report_checkpoint", "run_training", "scaling_config", "setup_worker_logging", "summarize", "train_loop"]
