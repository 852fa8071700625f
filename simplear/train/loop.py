"""`train_loop`: one loop for every worker, from the latest checkpoint (or the init) to `steps`, resumable exactly."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from simplear.train.config import OPTIMIZER, TRAINER_STATE, TrainConfig, lr_at
from simplear.train.metrics import MetricsWriter
from simplear.train.parallel import all_reduce, autocast_for, full_state, gather_all, no_sync, param_groups, unsharded, wrap_model
from simplear.train.sessions import ReportClock, report_checkpoint
from simplear.train.task import TrainTask
from simplear.train.workdir import WorkDir
from simplear.train_data import Position

log = logging.getLogger("simplear.train")


def train_loop(task: TrainTask, cfg: TrainConfig, session, out_dir: str | Path | WorkDir, run_info: dict | None = None) -> dict:
    """Train from the latest checkpoint (or the task's init) to `cfg.steps`; returns the last step's metrics.
    `out_dir`: where rank 0 writes its logs and figures (a folder, or a WorkDir published to object storage)."""
    import torch

    work = out_dir if isinstance(out_dir, WorkDir) else WorkDir.local(out_dir)
    out_dir = work.path
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
    wrapped = wrap_model(model, cfg, world, device)
    optimizer = torch.optim.AdamW(param_groups(wrapped, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if optim_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        del optim_state
    autocast = autocast_for(cfg, device, world)
    writer = MetricsWriter(out_dir, step, run=work.run) if rank == 0 else None
    rows = session.worker_rows(cfg.seed, cfg.shuffle_buffer)
    batches = task.micro_batches(rows, position, micro_bs, bundle)
    metrics: dict[str, Any] = {}
    clock = ReportClock(cfg.report_interval_s, rank)
    t_run = time.perf_counter()

    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Any] = {}
        for micro in range(cfg.grad_accum_steps):
            position, batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with no_sync(wrapped, sync=micro == cfg.grad_accum_steps - 1):
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
        sums["_report"] = clock.vote()
        totals = all_reduce(sums, device)  # also waits for the device, so the step time is real
        report = clock.decide(totals.pop("_report"))
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
            state = {"step": step, "positions": gather_all(rows.position().to_json(), world), "resumed_at": resumes,
                     "world_size": world, **(run_info or {})}
            _checkpoint(task, bundle, wrapped, optimizer, cfg, session, metrics, state)
            if writer:
                writer.flush()
                work.publish()
            clock.reset()
        elif report:
            session.report(metrics)

    if writer:
        writer.close()
    full = full_state(wrapped, cfg, world)
    if rank == 0:
        log.info("trained to step %d in %.1fs", step, time.perf_counter() - t_run)
        task.finish(bundle, unsharded(bundle, full), out_dir, device, autocast)
        work.publish()
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

    full = full_state(wrapped, cfg, session.world_size)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write(d: Path) -> None:
        task.save(bundle, unsharded(bundle, full), d, extra={"trainer_state": state, "train": cfg.model_dump(mode="json")})
        torch.save(optim_state, d / OPTIMIZER)
        (d / TRAINER_STATE).write_text(json.dumps(state, indent=2))

    report_checkpoint(session, metrics, f"checkpoint-{state['step']:08d}", write)
