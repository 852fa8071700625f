"""The reference benchmark protocol (`protocol: simplear` on a prompt set): how wdrink/SimpleAR's benchmark scripts
(scripts/eval/bench_geneval.sh and bench_dpg.sh over simpar/eval/model_t2i.py, at d56b6e5) draw GenEval and
DPG-Bench, so that a release is scored here as it was scored for its published figures.

What those scripts do, and this module does the same way:
- the text of each prompt is one of twenty style prefixes (the training code's list, `STYLE_PREFIXES`) followed by
  the prompt (GenEval: its `reprompt` where a line has one); its negative prompt is another draw of a prefix followed
  by the benchmark's negative text. Each is built by the training code's preprocessing, which first draws a
  caption-dropout number it does not use, so an item takes four draws from Python's `random`: (drop, prefix) for
  the prompt, then (drop, prefix) for the negative;
- those draws come from the script's DataLoader workers: with `--seed` s the script calls `torch.manual_seed(s)`,
  and each of its `--num-workers` (4) workers seeds `random` with the loader's base seed (the first int64 the
  default generator draws after that) + its worker index; with batch size 1, item l of a process goes to worker
  l mod 4. With several GPUs, each process (one per GPU) takes one contiguous chunk of the prompts and starts its
  own loader from the same seed;
- CFG 6, temperature 1, top-k 64,000 (every Cosmos code), top-p 1, 4 images per prompt, 1024 px.

Assumed, as the scripts run: no draw from torch's default generator between the script's `torch.manual_seed` and
its loader (the model loads with initialisation skipped), and DPG-Bench's prompt files listed in name order (the
script takes `os.listdir`'s order, which the file system decides; GenEval's are in file order).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from simplear.config import StrictModel
from simplear.sampling.spec import SamplingSpec

STYLE_PREFIXES = (
    "A detailed digital painting of ", "A highly realistic image of ", "An abstract representation of ",
    "A fantasy illustration featuring ", "A photorealistic depiction of ", "A vibrant, colorful scene of ",
    "A surreal dreamscape of ", "A futuristic cityscape with ", "An epic landscape showcasing ",
    "A minimalistic black and white sketch of ", "A cinematic view of ", "An ethereal depiction of ",
    "A hyper-realistic portrayal of ", "An imaginative interpretation of ", "A whimsical illustration of ",
    "A magical world featuring ", "An iconic scene from ", "A steampunk-inspired version of ",
    "A vintage-style artwork of ", "A high-tech sci-fi scene with ",
)
BENCHMARK_NEGATIVE = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                      "bad teeth, bad eyes, bad limbs, distortion")
# the scripts' flags; the negative prompt is per item (`DrawRequest`), the template is the plain prompt
BENCHMARK_SAMPLING = SamplingSpec(cfg_scale=6.0, temperature=1.0, top_k=64000, top_p=1.0, negative_prompt="",
                                  prompt_template="{prompt}")
IMAGES_PER_PROMPT = 4
IMAGE_SIZE = 1024

# The published figures of the releases (the reference README's model zoo table), on this project's scales
# (GenEval overall in [0, 1]; DPG-Bench as a fraction, the README's 79.66 being 0.7966).
REFERENCE_FIGURES = {
    "simplear-0.5b-sft": {"geneval": 0.53, "dpg": 0.7934},
    "simplear-0.5b-rl": {"geneval": 0.59, "dpg": 0.7966},
    "simplear-1.5b-sft": {"geneval": 0.61, "dpg": 0.8011},
    "simplear-1.5b-rl": {"geneval": 0.63, "dpg": 0.8131},
}
FIGURES_SOURCE = "wdrink/SimpleAR README (model zoo), CFG 6 at 1024 px"


def release_name(name: str) -> str | None:
    """The published release a folder or hub id names (`Daniel0724/SimpleAR-0.5B-RL`, `simpar_0.5B_rl`), if any."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-").replace("simpar-", "simplear-")
    base = base.replace("-grpo", "-rl")
    return base if base in REFERENCE_FIGURES else None


class ReferenceProtocol(StrictModel):
    """`protocol: simplear` (or this mapping, to describe the reference run being matched)."""

    kind: Literal["simplear"] = "simplear"
    seed: int = Field(0, description="the reference scripts' --seed")
    chunks: int = Field(1, ge=1, description="processes the reference run split the prompts over: one per GPU in "
                                             "its CUDA_VISIBLE_DEVICES (its docs/EVAL.md runs 8)")
    loader_workers: int = Field(4, ge=0, description="its DataLoader's --num-workers")

    @model_validator(mode="before")
    @classmethod
    def _named(cls, value):
        return {"kind": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class DrawRequest:
    """What the engine is asked for one prompt: its text, and its own negative prompt (None: the set's)."""

    text: str
    negative_prompt: str | None = None


def loader_base_seed(seed: int) -> int:
    """The base seed a torch DataLoader gives its workers after `torch.manual_seed(seed)`: the default generator's
    first int64 draw."""
    import torch

    return int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed)).item())


def _styled(rng: random.Random, text: str) -> str:
    rng.random()  # the caption-dropout draw of the training code's preprocessing (p = 0 at evaluation)
    return rng.choice(STYLE_PREFIXES) + text


def reference_requests(prompts: list[str], protocol: ReferenceProtocol) -> list[DrawRequest]:
    """Each prompt's text and negative prompt as the reference run draws them (see the module docstring)."""
    n = len(prompts)
    size = math.ceil(n / protocol.chunks) if n else 0
    base = loader_base_seed(protocol.seed) if protocol.loader_workers else None
    out = []
    for start in range(0, n, size or 1):
        if base is None:  # no workers: the script's own `random.seed(seed)` stream
            streams = [random.Random(protocol.seed)]
        else:
            streams = [random.Random(base + w) for w in range(protocol.loader_workers)]
        for local, prompt in enumerate(prompts[start: start + size]):
            rng = streams[local % len(streams)]
            text = _styled(rng, prompt)
            out.append(DrawRequest(text, _styled(rng, BENCHMARK_NEGATIVE)))
    return out
