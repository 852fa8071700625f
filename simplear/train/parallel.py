"""Across workers: DDP or FSDP2 wrapping, bf16 autocast, gradient sync, all-reduce and gathering, full state dicts."""

from __future__ import annotations

import contextlib
from typing import Any

from simplear.train.config import TrainConfig
from simplear.train.task import Bundle


def is_sharded(cfg: TrainConfig, world_size: int) -> bool:
    return cfg.strategy == "fsdp" and world_size > 1


def wrap_model(model, cfg: TrainConfig, world_size: int, device):
    """DDP through Ray's prepare_model, or FSDP2 (`fully_shard` per decoder layer, then the root)."""
    import torch

    if world_size == 1:
        return model.to(device)
    if not is_sharded(cfg, world_size):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16(cfg, device) else MixedPrecisionPolicy()
    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def use_bf16(cfg: TrainConfig, device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast_for(cfg: TrainConfig, device, world_size: int):
    """bf16 autocast over fp32 master weights (FSDP2 casts through its mixed-precision policy instead)."""
    import torch

    if use_bf16(cfg, device) and not is_sharded(cfg, world_size):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def no_sync(model, sync: bool):
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def all_reduce(values: dict[str, Any], device) -> dict[str, float]:
    """Sums over workers of 0-d values (one collective for all of them)."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def full_state(model, cfg: TrainConfig, world_size: int):
    """The full model state dict on CPU (a collective under FSDP); None when the unwrapped module can be saved as is."""
    if not is_sharded(cfg, world_size):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(bundle: Bundle, full_state):
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


def gather_all(value: dict, world: int) -> list[dict]:
    """Every worker's `value`, in rank order (one process: just this one's)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out
