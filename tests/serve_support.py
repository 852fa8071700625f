"""Helpers of the serving tests: a tiny checkpoint whose greedy picks are clear-cut, more apps on the session's
Serve, and an API key file."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

LEVELS = 4  # pixel-fsq: 64 codes, 8 px per code


def make_checkpoint(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny Qwen2 saved with save_checkpoint. Its embeddings are scaled up (like tests/test_sampler.py)
    so that logits spread widely: greedy choices then do not hinge on float noise between two engines."""
    from simplear.model import build_model, save_checkpoint
    from simplear.vocab import Vocabulary

    vocab = Vocabulary("tiny", codebook_size=LEVELS**3)
    torch.manual_seed(seed)
    model = build_model("tiny", vocab, num_hidden_layers=layers)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40)
        model.get_output_embeddings().weight.mul_(8)
    return save_checkpoint(path, model, vocab, {"kind": "pixel-fsq", "levels": LEVELS, "device": "cpu"})


@contextmanager
def deployed(base, name: str, **updates) -> Iterator:
    """Another app over `base`'s checkpoint on the session's Serve (route prefix /<name>), removed afterwards:
    the config is validated, like a workflow's."""
    from ray import serve

    from conftest import ServedApp
    from simplear.serving import ServeConfig, start

    cfg = ServeConfig.model_validate({**base.config.model_dump(), "app_name": name, "route_prefix": f"/{name}", **updates})
    start(base.checkpoint, cfg, cpus=0)
    try:
        yield ServedApp(url=cfg.url, checkpoint=base.checkpoint, config=cfg, port=base.port)
    finally:
        serve.delete(name)


def write_keys(path: Path, *keys: str) -> str:
    path.write_text("# one API key per line\n" + "".join(f"{k}\n" for k in keys))
    return str(path)
