"""One interface for every evaluation score, so that the eval stage and GRPO's held-out evaluation call the
same thing whatever the benchmark: GenEval, DPG-Bench, CLIP score, HPS, the demo's shapes.

- An `EvalItem` is a prompt and what the benchmark knows about it (`metadata`: GenEval's metadata line, DPG's
  item id and questions); `id` names the image in written results. Plain prompts (GRPO's held-out set) are
  items without metadata: the benchmark scorers give them `None`, the reward scorers score them.
- `Scorer.score(images, items) -> list[dict]`: one dict per image with at least `score` (a float, higher is
  better, or None when this scorer cannot score that image) and `category` (or None), plus its detail.
- `Scorer.figures`: per-image fields (booleans or numbers) that are figures of their own beside `score`, e.g.
  the demo's colour attribution and shape correctness, whose product is its `score`.
- `Scorer.aggregate(per_image) -> dict`: `overall` (a `{"mean", "se", "count"}`), `categories` (name -> one
  of those), `figures` (each of `Scorer.figures` -> one of those), `unscored` (how many images scored None),
  and whatever the benchmark adds.
- `Scorer.records(per_image) -> {file name: text}`: the per-image records, in the benchmark's own format where
  it has one (GenEval's results.jsonl), so its tools read them; the caller writes them wherever the run keeps
  its files (a folder or a bucket).

Configs are here, not in each scorer's module, so that the union and `build_scorer` import no model code.
"""

from __future__ import annotations

import json
import math
import statistics
from abc import ABC, abstractmethod
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import Field, TypeAdapter

from simplear.config import StrictModel
from simplear.rewards import ClipRewardConfig, HpsRewardConfig, Reward
from simplear.vqa_judge import VqaJudgeConfig


class EvalItem(StrictModel):
    prompt: str
    id: str | None = None
    metadata: dict[str, Any] = {}

    @property
    def tag(self) -> str | None:
        """GenEval's task, which the reward scorers also break their scores down by."""
        return self.metadata.get("tag")


def items_from_prompts(prompts: Sequence[str]) -> list[EvalItem]:
    return [EvalItem(prompt=p) for p in prompts]


# -- configs -----------------------------------------------------------------------------------


class GenEvalConfig(StrictModel):
    """GenEval's options (`evaluate_images.py --options`), with its defaults."""

    kind: Literal["geneval"] = "geneval"
    detector: str = "facebook/mask2former-swin-small-coco-instance"  # hub id or folder (weights + preprocessor)
    detector_resize: tuple[int, int] | None = Field(
        (800, 1333), description="shortest and longest edge the image is resized to, keeping its ratio (GenEval's mmdet "
                                 "test pipeline: 800, 1333); None: the processor's own (the hub's: a 384 x 384 stretch)")
    threshold: float = Field(0.3, ge=0, le=1)
    counting_threshold: float = Field(0.9, ge=0, le=1)
    max_objects: int = Field(16, ge=1, description="per class, the most confident first")
    max_overlap: float = Field(1.0, gt=0, le=1, description="IoU at which a less confident box of the same class is "
                               "dropped; 1 keeps all (GenEval's default)")
    position_margin: float = Field(0.1, ge=0, description="of the two boxes' summed sizes, an offset that does not count")
    crop_background: str = "#999999"  # what the colour classifier sees outside an object's mask
    colour_clip: ClipRewardConfig = ClipRewardConfig(model="ViT-L-14", pretrained="openai")
    device: str = "auto"
    batch_size: int = Field(8, ge=1)


class DpgConfig(StrictModel):
    kind: Literal["dpg"] = "dpg"
    judge: VqaJudgeConfig = VqaJudgeConfig()
    tiles: int = Field(4, ge=1, le=4, description="tiles of the 2x2 grid asked, in DPG's order (top left, top right, "
                       "bottom left, bottom right)")
    category_scores: Literal["official", "all_tiles"] = Field(
        "official", description="official: as compute_dpg_bench.py, the raw answers on the last tile asked; "
                                "all_tiles: the scores after the parent rule, averaged over the tiles")


class ClipScoreConfig(StrictModel):
    """The CLIP reward's cosine as an evaluation score (not scaled by 100 as torchmetrics' CLIPScore is)."""

    kind: Literal["clip_score"] = "clip_score"
    reward: ClipRewardConfig = ClipRewardConfig()


class HpsScoreConfig(StrictModel):
    kind: Literal["hps"] = "hps"
    reward: HpsRewardConfig


class ShapesConfig(StrictModel):
    kind: Literal["shapes"] = "shapes"
    border: float = Field(0.125, gt=0, lt=0.5, description="width of the border ring the background colour is read "
                          "from, as a fraction of each side")
    max_distance: float = Field(80.0, gt=0, description="RGB distance beyond which a pixel matches no palette colour")


ScorerConfig = Annotated[Union[GenEvalConfig, DpgConfig, ClipScoreConfig, HpsScoreConfig, ShapesConfig],
                         Field(discriminator="kind")]


# -- the interface -----------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> dict:
    """Mean, its standard error (None under two values) and the count: every figure is reported with its noise."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "se": None, "count": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "count": len(values)}


def by_category(pairs) -> dict[str, dict]:
    """(category, value) pairs -> {category: mean_se}, categories in order of first appearance."""
    groups: dict[str, list[float]] = {}
    for category, value in pairs:
        groups.setdefault(category, []).append(value)
    return {c: mean_se(v) for c, v in groups.items()}


class Scorer(ABC):
    name: str
    figures: tuple[str, ...] = ()

    @abstractmethod
    def score(self, images, items: Sequence[EvalItem]) -> list[dict]: ...

    def aggregate(self, per_image: Sequence[dict]) -> dict:
        scored = [r for r in per_image if r["score"] is not None]
        return {
            "overall": mean_se([r["score"] for r in scored]),
            "categories": by_category((r["category"], r["score"]) for r in scored if r["category"] is not None),
            "figures": {f: mean_se([float(r[f]) for r in scored if r.get(f) is not None]) for f in self.figures},
            "unscored": len(per_image) - len(scored),
        }

    def records(self, per_image: Sequence[dict]) -> dict[str, str]:
        return {f"{self.name}.jsonl": "".join(json.dumps(r) + "\n" for r in per_image)}


def check_lengths(images, items: Sequence[EvalItem]) -> None:
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images but {len(items)} items")


def as_pil_images(images) -> list:
    """What the scorers take (a (B, 3, H, W) tensor in [-1, 1], tensors or PIL images) as RGB PIL images, which
    the detector's and the judge's processors expect."""
    from simplear.rewards import as_image_list
    from simplear.visual_tokenizers import tensor_to_pil

    if isinstance(images, (list, tuple)) and all(hasattr(i, "convert") for i in images):
        return [i.convert("RGB") for i in images]
    return [tensor_to_pil(t) for t in as_image_list(images)]


class RewardScorer(Scorer):
    """Any `simplear.rewards` Reward as a scorer: one implementation of each model for training and evaluation."""

    def __init__(self, reward: Reward, name: str | None = None):
        self.reward = reward
        self.name = name or reward.name

    def score(self, images, items: Sequence[EvalItem]) -> list[dict]:
        check_lengths(images, items)
        values = self.reward(images, [i.prompt for i in items])
        return [{"id": i.id, "prompt": i.prompt, "score": v, "category": i.tag} for i, v in zip(items, values)]


def build_scorer(config) -> Scorer:
    """From a scorer config (a model or a dict with its `kind`)."""
    if isinstance(config, dict):
        config = TypeAdapter(ScorerConfig).validate_python(config)
    if isinstance(config, GenEvalConfig):
        from simplear.scorers.geneval import GenEvalScorer

        return GenEvalScorer(config)
    if isinstance(config, DpgConfig):
        from simplear.scorers.dpg import DpgScorer

        return DpgScorer(config)
    if isinstance(config, ShapesConfig):
        from simplear.scorers.shapes import ShapesScorer

        return ShapesScorer(config)
    if isinstance(config, (ClipScoreConfig, HpsScoreConfig)):
        from simplear.rewards import build_reward

        return RewardScorer(build_reward(config.reward), name=config.kind)
    raise TypeError(f"not a scorer config: {config!r}")
