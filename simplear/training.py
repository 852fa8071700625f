"""The training loop of the project: pretrain and SFT are this loop plus their hooks; GRPO runs trl's
trainer in the same Ray Train setup (`fit(worker=...)`) and shares the checkpoint layout, metrics and samples.

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

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from simplear.config import ConfigError, StrictModel
from simplear.train_data import DataFile, Position, WorkerRows
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import MAX_TEXT_TOKENS

log = logging.getLogger("simplear.train")

LEGACY_CHECKPOINTS = "checkpoints"  # the Ray Train run folder of runs before the run was named after its stage
FINAL = "final"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples.png"
LOSS_CURVE = "loss_curve.png"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


# ---------------------------------------------------------------------------------------------
# configuration


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


# ---------------------------------------------------------------------------------------------
# sessions: what the loop needs from its surroundings (Ray Train, or one plain process)


class RaySession:
    """Inside a Ray Train worker: its rows of the data files, the latest checkpoint, reports."""

    def __init__(self, files: list[DataFile], columns: list[str]):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.files, self.columns = files, columns

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


# ---------------------------------------------------------------------------------------------
# hooks


@dataclass
class Bundle:
    """What a task builds: the model (fp32 master weights, unwrapped) and what a checkpoint needs besides."""

    model: Any
    vocab: Any
    visual_tokenizer_config: VisualTokenizerConfig


class TrainTask:
    """The hooks of `train_loop`. Subclasses are pickled to every worker, so keep them to plain config."""

    seed: int = 0

    def build(self, device, resume_dir: Path | None) -> Bundle:
        """The model to train: from `resume_dir` (a checkpoint of this run) when resuming, else the task's init."""
        raise NotImplementedError

    def collate(self, rows: dict[str, np.ndarray], position: Position, rank: int, bundle: Bundle) -> dict:
        """One micro-batch of tensors (on CPU) from rows of the data shard."""
        raise NotImplementedError

    def loss(self, model, batch: dict, bundle: Bundle) -> tuple[Any, dict[str, Any]]:
        """(loss to minimise, sums to log: each value a 0-d tensor, summed over micro-batches and workers)."""
        raise NotImplementedError

    def micro_batches(self, rows: WorkerRows, start: Position, batch_size: int, bundle: Bundle) -> Iterator[tuple[Position, dict]]:
        """Endless micro-batches from `start`; each comes with the (epoch, batch) after it."""
        for position, values in rows.batches(start, batch_size):
            yield position, self.collate(values, position, rows.rank, bundle)

    def save(self, bundle: Bundle, model, directory: Path, extra: dict) -> None:
        """Write a checkpoint of `model` (unsharded, same weights as bundle.model) to `directory`."""
        from simplear.model import save_checkpoint

        save_checkpoint(directory, model, bundle.vocab, bundle.visual_tokenizer_config, extra=extra)

    def finish(self, bundle: Bundle, model, out_dir: Path, device, autocast) -> None:
        """Rank 0, after the final checkpoint: e.g. the sample grid."""


# ---------------------------------------------------------------------------------------------
# the loop


def _sharded(cfg: TrainConfig, world_size: int) -> bool:
    return cfg.strategy == "fsdp" and world_size > 1


def _wrap(model, cfg: TrainConfig, world_size: int, device):
    """DDP through Ray's prepare_model, or FSDP2 (`fully_shard` per decoder layer, then the root)."""
    import torch

    if world_size == 1:
        return model.to(device)
    if not _sharded(cfg, world_size):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if _use_bf16(cfg, device) else MixedPrecisionPolicy()
    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _use_bf16(cfg: TrainConfig, device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _autocast(cfg: TrainConfig, device, world_size: int):
    """bf16 autocast over fp32 master weights (FSDP2 casts through its mixed-precision policy instead)."""
    import torch

    if _use_bf16(cfg, device) and not _sharded(cfg, world_size):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _no_sync(model, sync: bool):
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_reduce(values: dict[str, Any], device) -> dict[str, float]:
    """Sums over workers of 0-d values (one collective for all of them)."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _full_state(model, cfg: TrainConfig, world_size: int):
    """The full model state dict on CPU (a collective under FSDP); None when the unwrapped module can be saved as is."""
    if not _sharded(cfg, world_size):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _unsharded(bundle: Bundle, full_state):
    """A plain module with the trained weights: bundle.model itself, or (FSDP) a copy built from the full state."""
    if full_state is None:
        return bundle.model
    import torch

    with torch.device("meta"):
        copy = type(bundle.model)(bundle.model.config)
    copy.load_state_dict(full_state, assign=True)
    for name, buf in bundle.model.named_buffers():  # not in the state dict (e.g. rotary inv_freq): FSDP leaves them whole
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner)._buffers[leaf] = buf.detach().to("cpu", copy=True)
    copy.tie_weights()
    return copy


class MetricsWriter:
    """Rank 0's per-step metrics: metrics.jsonl (rows past a resumed step dropped) and TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def write(self, metrics: dict) -> None:
        from simplear.workflow.metrics import gauge

        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        stage = self.path.parent.name
        gauge(stage, "train_step", metrics["step"])
        if isinstance(metrics.get("loss"), (int, float)):
            gauge(stage, "train_loss", metrics["loss"])
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        self.tb.close()


def train_loop(task: TrainTask, cfg: TrainConfig, session, out_dir: str | Path, run_info: dict | None = None) -> dict:
    """Train from the latest checkpoint (or the task's init) to `cfg.steps`; returns the last step's metrics."""
    import torch

    out_dir = Path(out_dir)
    rank, world = session.rank, session.world_size
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = session.device
    micro_bs = cfg.micro_batch_size(world)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker

    with session.latest_checkpoint() as resume_dir:
        bundle = task.build(device, resume_dir)
        state = json.loads((resume_dir / TRAINER_STATE).read_text()) if resume_dir else {}
        optim_state = torch.load(resume_dir / OPTIMIZER, map_location="cpu", weights_only=True) if resume_dir else None
    step = state.get("step", 0)
    position = _resume_position(state, rank, world)
    resumes = state.get("resumed_at", []) + ([step] if resume_dir else [])
    if rank == 0:
        log.info("%s at step %d of %d (world %d, micro-batch %d x %d accumulation, device %s)",
                 "resuming" if resume_dir else "starting", step, cfg.steps, world, micro_bs, cfg.grad_accum_steps, device)

    model = bundle.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    wrapped = _wrap(model, cfg, world, device)
    optimizer = torch.optim.AdamW(_param_groups(wrapped, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if optim_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        del optim_state
    autocast = _autocast(cfg, device, world)
    writer = MetricsWriter(out_dir, step) if rank == 0 else None
    rows = session.worker_rows(cfg.seed, cfg.shuffle_buffer)
    batches = task.micro_batches(rows, position, micro_bs, bundle)
    metrics: dict[str, Any] = {}
    t_run = t_report = time.perf_counter()

    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Any] = {}
        for micro in range(cfg.grad_accum_steps):
            position, batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _no_sync(wrapped, sync=micro == cfg.grad_accum_steps - 1):
                with autocast():
                    loss, stats = task.loss(wrapped, batch, bundle)
                (loss / cfg.grad_accum_steps).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sums["_grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # rank 0's clock decides when to report, so that every worker reports on the same steps
        sums["_report"] = float(rank == 0 and time.perf_counter() - t_report >= cfg.report_interval_s)
        totals = _all_reduce(sums, device)  # also waits for the device, so the step time is real
        report = totals.pop("_report") > 0
        dt = time.perf_counter() - t0
        metrics = {"step": step, "lr": lr, "grad_norm": totals.pop("_grad_norm") / world, "step_s": round(dt, 4),
                   "epoch": position.epoch}
        metrics.update(_ratios(totals))
        if "tokens" in totals:
            metrics["tokens_per_s"] = totals["tokens"] / dt
        if writer and (step % cfg.log_every == 0 or step in (1, cfg.steps)):
            writer.write(metrics)
            log.info("step %d/%d loss %.4f image_loss %.4f lr %.2e %.0f tokens/s", step, cfg.steps,
                     metrics.get("loss", float("nan")), metrics.get("image_loss", float("nan")), lr, metrics.get("tokens_per_s", 0))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"step": step, "positions": _gather(rows.position().to_json(), world), "resumed_at": resumes,
                     "world_size": world, **(run_info or {})}
            _checkpoint(task, bundle, wrapped, optimizer, cfg, session, metrics, state)
        elif report:
            session.report(metrics)
        else:
            continue
        t_report = time.perf_counter()

    if writer:
        writer.close()
    full = _full_state(wrapped, cfg, world)
    if rank == 0:
        log.info("trained to step %d in %.1fs", step, time.perf_counter() - t_run)
        task.finish(bundle, _unsharded(bundle, full), out_dir, device, autocast)
    return metrics


def _resume_position(state: dict, rank: int, world: int) -> Position:
    """This worker's data position in a checkpoint's state; a different number of workers is refused."""
    if not state:
        return Position()
    positions = state.get("positions")
    if positions is None:  # a checkpoint of the loop before per-worker positions: (epoch, batch) only
        raise RuntimeError("this checkpoint predates per-worker data positions and cannot be resumed exactly: "
                           "rerun the stage afresh (`--force`)")
    if len(positions) != world:
        raise RuntimeError(f"the checkpoint was written by {len(positions)} workers, this run has {world}: each worker's "
                           "files and position are its own, so resume with resources.concurrency: "
                           f"{len(positions)} (or rerun the stage afresh with `--force`)")
    return Position.from_json(positions[rank])


def _gather(value: dict, world: int) -> list[dict]:
    """Every worker's `value`, in rank order (one process: just this one's)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _ratios(totals: dict[str, float]) -> dict[str, float]:
    """`x_sum` / `x_count` pairs from the tasks' stats become `x`; other sums pass through."""
    out = {}
    for k, v in totals.items():
        if k.endswith("_sum"):
            n = totals.get(k[:-4] + "_count", 0)
            out[k[:-4]] = v / n if n else float("nan")
        elif not k.endswith("_count"):
            out[k] = v
    return out


def _checkpoint(task, bundle, wrapped, optimizer, cfg, session, metrics, state) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = _full_state(wrapped, cfg, session.world_size)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    name = f"checkpoint-{state['step']:08d}"
    if session.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="simplear-ckpt-") as tmp:
        d = Path(tmp) / name
        task.save(bundle, _unsharded(bundle, full), d, extra={"trainer_state": state, "train": cfg.model_dump(mode="json")})
        torch.save(optim_state, d / OPTIMIZER)
        (d / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        session.report(metrics, d, name)


# ---------------------------------------------------------------------------------------------
# on Ray Train


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


# ---------------------------------------------------------------------------------------------
# after training: figures and summary metrics


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / METRICS
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row  # a resumed run rewrote steps after its checkpoint: the last line wins
    return [by_step[s] for s in sorted(by_step)]


def summarize(rows: list[dict]) -> dict:
    """Start/end figures of the run: the first logged step (the model as it came in) and the mean of the
    last tenth of the logged steps (1 to 10 of them, to smooth the batch noise)."""
    if not rows:
        return {}
    k = max(1, min(10, len(rows) // 10))
    out: dict[str, Any] = {"logged_steps": len(rows), "last_step": rows[-1]["step"]}
    for key in ("loss", "image_loss", "text_loss"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[f"{key}_start"] = round(values[0], 4)
            out[f"{key}_end"] = round(statistics.fmean(values[-k:]), 4)
    speeds = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r] or [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if speeds:
        out["tokens_per_s"] = round(statistics.median(speeds), 1)
    return out


def plot_loss_curve(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, label in (("loss", "loss (trained tokens)"), ("image_loss", "image-token loss"), ("text_loss", "text-token loss")):
        if any(key in r for r in rows):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=label, linewidth=1)
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="gray", linewidth=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    from simplear.workflow.manifest import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the text-to-image task of pretrain and SFT


class DataSpec(StrictModel):
    stage: str = "tokenize"  # the needed stage whose tokenized Parquet is read
    resolution: int | None = None  # its sub-folder for this resolution (`<stage>/<resolution>/part-*.parquet`); None: all its Parquet
    caption: Literal["original", "long", "short"] = "original"  # long/short fall back to the original when empty


class SequenceSpec(StrictModel):
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="probability that a caption is dropped (teaches the unconditional model)")
    image_loss_only: bool = False  # default: the loss covers every token, like the reference code
    max_text_tokens: int | None = Field(MAX_TEXT_TOKENS, ge=1, description="caption tokens kept (recaption writes up to 256)")


class SampleSpec(StrictModel):
    """The end-of-stage grid: `per_prompt` samples of each fixed prompt."""

    prompts: list[str] = [
        "a red circle on a blue background",
        "a yellow square on a black background",
        "a white triangle on a green background",
        "a purple diamond on an orange background",
    ]
    per_prompt: int = Field(4, ge=1)
    cfg_scale: float = Field(4.0, ge=0, description="on held-out demo captions 4 did at least as well as 3, and 3 better than 1.5-2")
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = 0
    cell_pixels: int = Field(96, ge=16, description="each sample is shown at least this big (nearest-neighbour)")


CAPTION_COLUMNS = {"original": "caption", "long": "caption_long", "short": "caption_short"}


class T2ITask(TrainTask):
    """Next-token training on `<|t2i|>` caption `<|soi|>` visual tokens: pretrain and SFT."""

    def __init__(self, *, sequence: SequenceSpec, caption: str, samples: SampleSpec | None, grid: tuple[int, int],
                 seed: int, checkpoint: str | None = None, model_init: str = "tiny", text_tokenizer: str | None = None,
                 model_overrides: dict | None = None, visual_tokenizer: VisualTokenizerConfig | None = None):
        self.sequence, self.caption, self.samples, self.grid, self.seed = sequence, caption, samples, grid, seed
        self.checkpoint, self.model_init, self.text_tokenizer = checkpoint, model_init, text_tokenizer
        self.model_overrides, self.visual_tokenizer = model_overrides or {}, visual_tokenizer

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([CAPTION_COLUMNS[self.caption], "caption", "codes"]))

    def build(self, device, resume_dir: Path | None) -> Bundle:
        import torch

        from simplear.model import build_model, load_checkpoint
        from simplear.vocab import Vocabulary

        source = resume_dir or self.checkpoint
        if source is not None:
            ck = load_checkpoint(source, device="cpu", dtype=torch.float32)
            return Bundle(ck.model, ck.vocab, ck.visual_tokenizer_config)
        vocab = Vocabulary(self.text_tokenizer or self.model_init, codebook_size=self.visual_tokenizer.codebook_size)
        model = build_model(self.model_init, vocab, dtype=torch.float32, **self.model_overrides)
        return Bundle(model, vocab, self.visual_tokenizer)

    def collate(self, rows: dict[str, np.ndarray], position: Position, rank: int, bundle: Bundle) -> dict:
        import torch

        chosen = rows[CAPTION_COLUMNS[self.caption]]
        captions = [c if isinstance(c, str) and c.strip() else o for c, o in zip(chosen, rows["caption"])]
        codes = [np.asarray(c, dtype=np.int64) for c in rows["codes"]]
        # CFG dropout draws depend on the data position only, so a resumed run drops the same captions
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{position.epoch}/{position.batch}/{rank}".encode()))
        return bundle.vocab.build_batch(captions, codes, cfg_dropout=self.sequence.cfg_dropout,
                                       image_loss_only=self.sequence.image_loss_only, generator=g,
                                       max_text_tokens=self.sequence.max_text_tokens)

    def loss(self, model, batch: dict, bundle: Bundle):
        import torch

        from simplear.losses import causal_lm_cross_entropy

        labels = batch["labels"]
        ce_BL = causal_lm_cross_entropy(model, batch)  # never the whole (B, L, 215.7k) logits in fp32
        target_BL = labels[:, 1:]
        trained = target_BL != -100
        image = trained & (target_BL >= bundle.vocab.visual_offset)
        text = trained & ~image
        n = trained.sum()
        loss = (ce_BL * trained).sum() / n.clamp(min=1)
        ce = ce_BL.detach()
        stats = {
            "loss_sum": loss.detach() * n, "loss_count": n,
            "image_loss_sum": (ce * image).sum(), "image_loss_count": image.sum(),
            "text_loss_sum": (ce * text).sum(), "text_loss_count": text.sum(),
            "tokens": batch["attention_mask"].sum(),
            "sequences": torch.tensor(labels.shape[0]),
        }
        return loss, stats

    def finish(self, bundle: Bundle, model, out_dir: Path, device, autocast) -> None:
        if self.samples is None:
            return
        grid_img = sample_grid(model, bundle.vocab, bundle.visual_tokenizer_config, self.samples, self.grid, device, autocast)
        from simplear.workflow.manifest import atomic_path

        with atomic_path(out_dir / SAMPLES) as tmp:
            grid_img.save(tmp, format="PNG")


def sample_grid(model, vocab, vt_config, spec: SampleSpec, grid: tuple[int, int], device, autocast=contextlib.nullcontext):
    """A PNG-ready image: one row per prompt (its text above), `per_prompt` samples each."""
    from PIL import Image, ImageDraw

    from simplear.sampler import SamplingParams, TorchSampler
    from simplear.visual_tokenizers import load_visual_tokenizer

    sampler = TorchSampler(model, vocab, load_visual_tokenizer(vt_config), device=device)
    prompts = [p for p in spec.prompts for _ in range(spec.per_prompt)]
    params = [SamplingParams(cfg_scale=spec.cfg_scale, temperature=spec.temperature, top_k=spec.top_k,
                             top_p=spec.top_p, seed=spec.seed + i) for i in range(len(prompts))]
    with autocast():
        images = sampler.generate_images(prompts, grid=grid, params=params)
    h, w = images[0].height, images[0].width
    zoom = max(1, math.ceil(spec.cell_pixels / max(h, w)))
    cw, ch, label, pad = w * zoom, h * zoom, 14, 4
    sheet = Image.new("RGB", (pad + spec.per_prompt * (cw + pad), len(spec.prompts) * (label + ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, prompt in enumerate(spec.prompts):
        y = pad + r * (label + ch + pad)
        draw.text((pad, y), prompt, fill="black")
        for c in range(spec.per_prompt):
            img = images[r * spec.per_prompt + c].resize((cw, ch), Image.NEAREST)
            sheet.paste(img, (pad + c * (cw + pad), y + label))
    return sheet


def train_progress(stage_dir: Path) -> str | None:
    """The last logged step (and loss) of a running or interrupted training stage, from its metrics.jsonl."""
    path = Path(stage_dir) / METRICS
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 8192))
        lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None
    loss = row.get("loss")
    return f"step {row.get('step')}" + (f", loss {loss:.4g}" if isinstance(loss, (int, float)) else "")


class T2IStageConfig(StrictModel):
    """What pretrain and SFT share; each stage adds how its model starts (`init`)."""

    data: DataSpec
    sequence: SequenceSpec = SequenceSpec()
    train: TrainConfig
    samples: SampleSpec | None = SampleSpec()


@dataclass
class TokenizedData:
    files: list[DataFile]  # with their row counts, from the data stage's manifest
    grid: tuple[int, int]  # codes per column and row of the most common image size
    downsample: int  # pixels per code side, from the first row
    rows: int
    visual_tokenizer: dict | None  # what the data stage recorded, if anything


def tokenized_data(ctx, spec: DataSpec, where: str) -> TokenizedData:
    """The data stage's Parquet for this resolution, checked before any training starts."""
    import pyarrow.parquet as pq

    if spec.stage not in ctx.needs:
        raise ConfigError(f"{where}.data.stage: {spec.stage!r} is not among the stage's needs {ctx.needs}")
    base = ctx.input_dir(spec.stage)
    rows_of = {str(base / o["path"]): int(o.get("rows") or 0) for o in ctx.input_manifest(spec.stage)["outputs"]}
    files = ctx.input_files(spec.stage, ".parquet")
    if spec.resolution is not None:
        found = sorted({f.relative_to(base).parts[0] for f in files if len(f.relative_to(base).parts) > 1})
        files = [f for f in files if f.relative_to(base).parts[0] == str(spec.resolution)]
        if not files:
            raise ConfigError(f"{where}.data.resolution: stage {spec.stage!r} has no Parquet under {base / str(spec.resolution)} "
                              f"(resolutions it has: {', '.join(found) or 'none'})")
    if not files:
        raise ConfigError(f"{where}.data.stage: stage {spec.stage!r} recorded no Parquet outputs")
    schema = pq.read_schema(files[0])
    needed = {"codes", "caption", CAPTION_COLUMNS[spec.caption], "height", "width"}
    missing = sorted(needed - set(schema.names))
    if missing:
        raise ConfigError(f"{where}.data: {files[0]} lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    # sizes from the manifest and one row: every row of a resolution's folder has that resolution's size
    listed = [DataFile(str(f), rows_of.get(str(f), 0)) for f in files]
    rows = sum(f.rows for f in listed)
    if not rows:
        raise ConfigError(f"{where}.data: the Parquet of stage {spec.stage!r} has no rows")
    first_file = next(f for f in listed if f.rows)
    first = pq.ParquetFile(first_file.path).read_row_group(0, columns=["codes", "height", "width"]).slice(0, 1).to_pylist()[0]
    h, w = first["height"], first["width"]
    if h * w % len(first["codes"]):
        raise ConfigError(f"{where}.data: {first_file.path}: {len(first['codes'])} codes for a {h}x{w} image")
    d = int(round(math.sqrt(h * w / len(first["codes"]))))
    return TokenizedData(files=listed, grid=(h // d, w // d), downsample=d, rows=rows, visual_tokenizer=_data_tokenizer(ctx, spec.stage))


def _data_tokenizer(ctx, stage: str) -> dict | None:
    """The visual tokenizer config the data stage encoded with: its `tokenizer.json`, else its config's `tokenizer`."""
    info = read_json_file(ctx.input_dir(stage) / "tokenizer.json") or {}
    if isinstance(info.get("config"), dict):
        return info["config"]
    config = ctx.input_manifest(stage).get("config", {})
    for key in ("tokenizer", "visual_tokenizer"):
        if isinstance(config.get(key), dict) and "kind" in config[key]:
            return config[key]
    return None


def read_json_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_codebook(data: TokenizedData, vt: VisualTokenizerConfig, where: str) -> None:
    """Codes must fit the codebook the model is built for, and the data's tokenizer must be the model's."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if data.visual_tokenizer is not None:
        theirs = VisualTokenizerConfig.model_validate(data.visual_tokenizer)
        keys = ("kind", "levels", "downsample", "codebook_size", "path")
        diff = [k for k in keys if getattr(theirs, k) != getattr(vt, k) and not (k == "levels" and vt.kind != "pixel-fsq")]
        if diff:
            raise ConfigError(f"{where}: the data was tokenized with {theirs.model_dump(include=set(keys))} but the model's "
                              f"visual tokenizer is {vt.model_dump(include=set(keys))} (differs in {', '.join(diff)})")
    if data.downsample != vt.downsample:
        raise ConfigError(f"{where}: the data has one code per {data.downsample}x{data.downsample} pixels, "
                          f"the model's visual tokenizer one per {vt.downsample}x{vt.downsample}")
    top = pc.max(pc.list_flatten(pq.read_table(data.files[0].path, columns=["codes"])["codes"])).as_py()
    if top is not None and top >= vt.codebook_size:
        raise ConfigError(f"{where}: code {top} in {data.files[0].path} is outside the model's codebook of {vt.codebook_size}")


def run_t2i_stage(ctx, task_kwargs: dict, vt: VisualTokenizerConfig | None, data: TokenizedData):
    """Shared body of the pretrain and SFT stages, after each resolved its init: train, export, figures."""
    from simplear.workflow.context import StageResult

    cfg: T2IStageConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    if vt is not None:
        check_codebook(data, vt, where)
    task = T2ITask(sequence=cfg.sequence, caption=cfg.data.caption, samples=cfg.samples, grid=data.grid,
                   seed=cfg.train.seed, visual_tokenizer=vt, **task_kwargs)
    t0 = time.time()
    result = fit(task, cfg.train, stage_dir=ctx.stage_dir, resources=ctx.resources, files=data.files, columns=task.columns,
                 run_info={"stage": ctx.name})
    if result.checkpoint is None:
        raise RuntimeError(f"{ctx.name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = export_final(Path(d), ctx.stage_dir / FINAL)
    if state["step"] != cfg.train.steps:
        raise RuntimeError(f"{ctx.name}: the last checkpoint is at step {state['step']}, not {cfg.train.steps}")
    rows = read_metrics(ctx.stage_dir)
    plot_loss_curve(rows, ctx.stage_dir / LOSS_CURVE, title=f"{ctx.name}: {data.rows} sequences, grid {data.grid[0]}x{data.grid[1]}")
    metrics = {"steps": state["step"], "resumed_at": state.get("resumed_at", []), "train_seconds": round(time.time() - t0, 1),
               "rows": data.rows, "grid": list(data.grid), **summarize(rows)}
    ctx.log.info("%s: %s", ctx.name, metrics)
    outputs = [FINAL, METRICS, LOSS_CURVE] + ([SAMPLES] if (ctx.stage_dir / SAMPLES).exists() else [])
    return StageResult(metrics=metrics, outputs=outputs, artifacts=[SAMPLES, LOSS_CURVE, f"{FINAL}/"])
