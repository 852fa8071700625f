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


def describe_hardware() -> dict:
    """What the calling process runs on, for a stage's manifest and the run report: the node, its CPUs (those this
    process may use), memory and the GPUs it sees; on Ray also the node's resources (a stage's own task holds no
    GPU, its workers do) and the cluster's totals."""
    import os
    import platform
    import socket

    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    out: dict = {"host": socket.gethostname(), "cpus": cpus, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                 "visible_gpus": gpus, "platform": platform.platform(terse=True), "torch": torch.__version__}
    try:
        import ray

        if ray.is_initialized():
            out["node_ip"] = ray.util.get_node_ip_address()
            me, nodes = ray.get_runtime_context().get_node_id(), ray.nodes()
            res = next((n["Resources"] for n in nodes if n["NodeID"] == me), {})
            out["node"] = {"CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0),
                           "accelerators": sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))}
            total = ray.cluster_resources()
            out["cluster"] = {"nodes": len([n for n in nodes if n.get("Alive")]), "CPU": total.get("CPU", 0),
                              "GPU": total.get("GPU", 0)}
    except Exception:  # noqa: BLE001 - a description, never a reason to fail a stage
        pass
    return out
