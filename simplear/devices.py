"""One rule for `device: auto` in every config (CUDA when this process sees a GPU, else the CPU), and one for the
weights' `dtype: auto` when serving."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_serving_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`dtype: auto` draws in bf16 on a GPU (half the weight reads per step; no log-prob is kept, so no precision is
    owed to training) and in fp32 elsewhere, whatever dtype the checkpoint was saved in (training checkpoints are fp32,
    releases bf16). GRPO loads in fp32 and runs under autocast itself."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
