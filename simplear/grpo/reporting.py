"""What a GRPO run leaves, in the shared layout: checkpoints that are both trl's resume state and a loadable
SimpleAR checkpoint, and the shared metrics rows (trl's log names mapped to ours)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from simplear.grpo.config import GRPOTask
from simplear.storage.staging import staging_dir
from simplear.train import TRAINER_STATE, MetricsWriter, ReportClock, TrainConfig, report_checkpoint
from simplear.train.workdir import WorkDir

log = logging.getLogger("simplear.grpo")

HF_STATE = "hf_trainer_state.json"  # trl/transformers' trainer_state.json, renamed beside ours
HF_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth")  # + rng_state_<rank>.pth
HF_RESUME_ONLY = (*HF_FILES, "rng_state*", HF_STATE)  # what final/ leaves out


def checkpoint_folder(hf_checkpoint: Path, dest: Path, model, vocab, vt_config, state: dict, extra: dict,
                      sampling) -> None:
    """A loadable SimpleAR checkpoint (HF layout, simplear.json) with trl's optimizer/scheduler/RNG files and
    its trainer state (as hf_trainer_state.json); our trainer_state.json holds step and resumes. trl's files are
    moved, not copied (both folders are in the node's staging dir): the optimizer state, twice the weights with
    AdamW, is staged once."""
    from simplear.model import save_checkpoint

    dest.mkdir(parents=True)
    for f in hf_checkpoint.iterdir():
        if f.name in HF_FILES or f.name.startswith("rng_state"):
            shutil.move(f, dest / f.name)
    shutil.copy2(hf_checkpoint / "trainer_state.json", dest / HF_STATE)
    save_checkpoint(dest, model, vocab, vt_config, extra={"trainer_state": state, **extra}, sampling=sampling)
    (dest / TRAINER_STATE).write_text(json.dumps(state, indent=2))


@contextlib.contextmanager
def hf_resume_view(checkpoint_dir: Path | None):
    """The folder trl resumes from: our checkpoint's files, with its own trainer_state.json put back."""
    if checkpoint_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="grpo-resume-", dir=staging_dir()) as tmp:
        view = Path(tmp)
        for f in checkpoint_dir.iterdir():
            if f.name not in (TRAINER_STATE, HF_STATE):
                os.symlink(f.resolve(), view / f.name)
        os.symlink((checkpoint_dir / HF_STATE).resolve(), view / "trainer_state.json")
        yield str(view)


def report_callback(task: GRPOTask, cfg: TrainConfig, work: WorkDir, session, resumed_at: list[int]):
    """transformers callback: the shared metrics rows (rank 0, published with each checkpoint), reports and
    checkpoints, on trl's logs and saves."""
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None  # set once the trainer exists: on_save needs its vocabulary and tokenizer config
            self.writer = None
            self.last: dict[str, Any] = {}
            self.clock = ReportClock(cfg.report_interval_s, session.rank)
            self.t_last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.t_last = time.perf_counter()
            self.clock.reset()
            if session.rank == 0:
                self.writer = MetricsWriter(work.path, state.global_step, run=work.run)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or "train_runtime" in logs:  # not a training step's line (e.g. the summary)
                return
            now = time.perf_counter()
            row = step_metrics(state.global_step, logs, now - self.t_last)
            self.t_last = now
            self.last = row
            if self.writer:
                self.writer.write(row)
                nan = float("nan")  # steps that reuse a generation (num_iterations > 1) have no new rewards
                log.info("step %d/%d reward %.4f±%.4f kl %.5f clip %.3f loss %.4f lr %.2e", row["step"], cfg.steps,
                         row.get("reward_mean", nan), row.get("reward_std", nan), row.get("kl", 0.0),
                         row.get("clip_fraction", 0.0), row.get("loss", nan), row.get("lr", 0.0))
            step = state.global_step
            saving = step % cfg.checkpoint_every == 0 or step >= state.max_steps
            if not saving and self.clock.due(session.device):
                session.report(row)

        def on_save(self, args, state, control, model=None, **kw):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            step = state.global_step
            hf_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            ours = {"step": step, "resumed_at": resumed_at, "world_size": args.world_size, "stage": task.stage}
            extra = {"train": cfg.model_dump(mode="json"), "grpo": task.grpo.model_dump(mode="json"),
                     "rollout_sampling": task.sampling.model_dump(mode="json"), "init": task.init_path}
            report_checkpoint(session, self.last or {"step": step}, f"checkpoint-{step:08d}",
                              lambda d: checkpoint_folder(hf_dir, d, model, self.trainer.vocab, self.trainer.simplear_vt_config,
                                                          ours, extra, task.defaults))
            self.clock.reset()
            shutil.rmtree(hf_dir, ignore_errors=True)  # reported: Ray Train's copy is the one kept
            if self.writer:
                self.writer.flush()
                work.publish()

        def on_train_end(self, args, state, control, **kw):
            if self.writer:
                self.writer.close()

    return ReportCallback()


def step_metrics(step: int, logs: dict, seconds: float) -> dict:
    """trl's log line, renamed: reward_mean/std, kl, clip_fraction, per-reward means, loss, lr."""
    rename = {"reward": "reward_mean", "reward_std": "reward_std", "kl": "kl", "clip_ratio/region_mean": "clip_fraction",
              "entropy": "entropy", "loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm",
              "frac_reward_zero_std": "frac_reward_zero_std", "step_time": "train_step_s"}
    row: dict[str, Any] = {"step": step}
    for k, v in logs.items():
        if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            continue
        if k in rename:
            row[rename[k]] = float(v)
        elif k.startswith("rewards/") and k.count("/") == 2:
            _, name, stat = k.split("/")
            row[f"reward_{name}_{stat}"] = float(v)
    row["step_s"] = round(seconds, 4)
    return row

