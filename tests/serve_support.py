"""Helpers of the serving tests: a tiny checkpoint whose greedy picks are clear-cut, and a Serve app on a free port."""

from __future__ import annotations

from pathlib import Path

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
