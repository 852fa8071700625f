"""Helpers of the serving tests: a tiny checkpoint whose greedy picks are clear-cut, more apps on the session's
Serve (one whose engine fails), and an API key file."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from simplear.serving.app import ImageServer

ENGINE_SECRET = "/secret/engine/state"  # what a failing engine's message holds and no client may see

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
    served = start(base.checkpoint, cfg, cpus=0)
    try:
        yield ServedApp(url=served.url, checkpoint=base.checkpoint, config=served, port=served.port)
    finally:
        serve.delete(name)


def write_keys(path: Path, *keys: str) -> str:
    path.write_text("# one API key per line\n" + "".join(f"{k}\n" for k in keys))
    return str(path)


class FailingEngine:
    """Fails as a real engine can (a GPU fault, a dead vLLM engine), with details meant for the log only."""

    def generate_images(self, prompts, size, params):
        raise RuntimeError(f"engine state lost at {ENGINE_SECRET}")


class FailingImageServer(ImageServer):
    def __init__(self, *args):
        super().__init__(*args)
        self.engine = FailingEngine()


@contextmanager
def deployed_failing(base, name: str) -> Iterator[str]:
    """The app over `base`'s checkpoint with an engine that fails every batch, at route prefix /<name>; yields its
    URL and removes it afterwards."""
    from ray import serve

    cfg = base.config.model_copy(update={"app_name": name, "route_prefix": f"/{name}"})
    deployment = serve.deployment(FailingImageServer, name="ImageServer", ray_actor_options={"num_cpus": 0},
                                  graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=0.1)
    serve.run(deployment.bind(str(base.checkpoint), cfg.model_dump(mode="json"), []), name=name,
              route_prefix=cfg.route_prefix)
    try:
        yield cfg.url
    finally:
        serve.delete(name)
