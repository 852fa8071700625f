"""The loop's settings (`train:`), the learning-rate schedule and the names of what a run leaves."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from simplear.config import ConfigError, StrictModel


LEGACY_CHECKPOINTS = "checkpoints"  # the Ray Train run folder of runs before the run was named after its stage
FINAL = "final"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples.png"
SAMPLES_BEFORE = "samples_before.png"  # GRPO: the initial checkpoint's grid, drawn like SAMPLES
LOSS_CURVE = "loss_curve.png"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


class TrainConfig(StrictModel):
    """The loop's settings; the stage's `train:` block."""

    steps: int = Field(ge=1, description="optimizer steps of the whole run")
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, all workers and accumulation together")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per worker per step")
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr/warmup_steps to lr")
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear decay ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay on matrices (not on norms and biases); the paper's 0.01")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"  # across workers; fsdp = torch FSDP2 per decoder layer
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1, description="how many checkpoints Ray Train keeps (None: all)")
    log_every: int = Field(1, ge=1, description="steps between lines in metrics.jsonl / TensorBoard / the log")
    report_interval_s: float = Field(5.0, ge=0, description="least seconds between metric reports to Ray Train (its controller takes one every ~2 s; more often stalls the loop)")
    max_failures: int = Field(2, ge=-1, description="FailureConfig: worker-group restarts from the latest checkpoint (-1: no limit)")
    seed: int = 0
    shuffle_buffer: int = Field(1024, ge=0, description="rows in each worker's shuffle buffer (0: file order; files are "
                                "shuffled per epoch either way); a resume reads this many rows again at most")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker (None: Ray's default, one per CPU asked)")

    @model_validator(mode="after")
    def _check(self):
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of grad_accum_steps {self.grad_accum_steps}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} > steps {self.steps}")
        return self

    def micro_batch_size(self, world_size: int) -> int:
        per_step = self.grad_accum_steps * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                f"train.grad_accum_steps {self.grad_accum_steps} x {world_size} workers (resources.concurrency)"
            )
        return self.global_batch_size // per_step


# TrainConfig keys that change speed, memory, logging or fault tolerance, never the weights a run ends with
TRAIN_OPERATIONAL = tuple(f"train.{k}" for k in ("checkpoint_every", "keep_checkpoints", "log_every", "report_interval_s",
                                                 "max_failures", "num_threads", "gradient_checkpointing"))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)
