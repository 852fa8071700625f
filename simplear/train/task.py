"""The hooks a stage gives the loop (`TrainTask`): build the model, collate rows, the loss, save, finish."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from simplear.sampling.spec import DEFAULT_SAMPLING, SamplingSpec
from simplear.train_data import Position, WorkerRows
from simplear.visual_tokenizers import VisualTokenizerConfig


@dataclass
class Bundle:
    """What a task builds: the model (fp32 master weights, unwrapped) and what a checkpoint needs besides."""

    model: Any
    vocab: Any
    visual_tokenizer_config: VisualTokenizerConfig
    sampling: SamplingSpec = field(default_factory=lambda: DEFAULT_SAMPLING)  # the defaults its checkpoints record


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

        save_checkpoint(directory, model, bundle.vocab, bundle.visual_tokenizer_config, extra=extra, sampling=bundle.sampling)

    def finish(self, bundle: Bundle, model, out_dir: Path, device, autocast) -> None:
        """Rank 0, after the final checkpoint: e.g. the sample grid."""
