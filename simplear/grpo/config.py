"""The GRPO stage's settings and the plain task every worker gets (pickled by Ray Train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from simplear.config import StrictModel
from simplear.rewards import RewardConfig
from simplear.sampling.spec import SamplingSpec
from simplear.scorers import ScorerConfig
from simplear.t2i import SampleSpec
from simplear.train import TrainConfig
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import MAX_TEXT_TOKENS


class PromptSpec(StrictModel):
    """Where prompts come from; `eval_count` distinct ones are held out of training for the evaluation."""

    source: Literal["stage", "file", "list"] = "stage"
    stage: str | None = None  # source "stage": a needed stage whose kept Parquet outputs have `column`
    resolution: int | None = None  # source "stage": only its `<resolution>/` folder (a tokenize stage's); never `rejected/`
    column: str = "caption"
    path: str | None = None  # source "file": a .txt (one prompt a line) or .parquet (`column`); relative to workflow.yaml
    items: list[str] | None = None  # source "list"
    max_prompts: int | None = Field(None, ge=1, description="distinct prompts read at most (the first ones found)")
    eval_count: int = Field(32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        need = {"stage": "stage", "file": "path", "list": "items"}[self.source]
        if not getattr(self, need):
            raise ValueError(f"source {self.source!r} needs `{need}`")
        return self


class GRPOSpec(StrictModel):
    """The algorithm (trl's names). Paper: lr 1e-5, batch 28; reference code: lr 1e-6, 4 generations, beta 0.04, eps 0.2."""

    num_generations: int = Field(4, ge=2, description="group size G: images per prompt")
    beta: float = Field(0.04, ge=0, description="weight of the KL to the frozen reference (the init model)")
    epsilon: float = Field(0.2, gt=0, description="ratio clip")
    epsilon_high: float | None = Field(None, gt=0)
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generated batch (mu)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"


class EvalSpec(StrictModel):
    samples_per_prompt: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 10_000
    sampling: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="keys left out: the rollouts' (`sampling`)")
    scorers: list[ScorerConfig] = Field([], description="scores reported but not trained on, the eval stage's scorers "
                                        "(`simplear.scorers`): shapes in the demo, hps in production")
    cfg_scales: list[float] = Field([], description="the evaluation again at these CFG scales (the serving one)")


class GRPOStageConfig(StrictModel):
    init: str = "sft"  # a needed stage (its final/ checkpoint) or a checkpoint folder
    visual_tokenizer: VisualTokenizerConfig | None = Field(
        None, exclude_if=lambda v: v is None,  # unset: the config (and its fingerprint) as before it existed
        description="`init` is a released checkpoint as published (it names none): the visual tokenizer it "
                          "decodes with")
    size: int | tuple[int, int] = Field(description="image size in pixels (square, or [height, width])")
    prompts: PromptSpec
    rewards: list[RewardConfig] = Field(min_length=1)
    sampling: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="how the groups' images are drawn; keys left out: the checkpoint defaults "
                                               "(`defaults`). The temperature cannot be 0: log-probs are over the "
                                               "untruncated distribution (top-k/top-p only restrict the draw)")
    defaults: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="the sampling settings its checkpoints record (generate, serve, eval use "
                                               "them unless told otherwise); keys left out: the init checkpoint's")
    grpo: GRPOSpec = GRPOSpec()
    train: TrainConfig  # global_batch_size: completions per optimizer step (prompts x num_generations)
    eval: EvalSpec = EvalSpec()
    samples: SampleSpec | None = None
    max_text_tokens: int | None = Field(MAX_TEXT_TOKENS, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.train.global_batch_size % self.grpo.num_generations:
            raise ValueError(f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                             f"grpo.num_generations {self.grpo.num_generations} (whole groups per step)")
        if self.train.strategy != "ddp":
            raise ValueError("train.strategy: the GRPO stage runs trl's trainer with DDP only")
        if self.train.lr_schedule == "linear" and self.train.min_lr_ratio:
            raise ValueError("train.min_lr_ratio: trl's linear schedule decays to 0; use lr_schedule cosine for a floor")
        if self.train.shuffle_buffer != TrainConfig.model_fields["shuffle_buffer"].default:  # (a dumped config holds the default)
            raise ValueError("train.shuffle_buffer: GRPO reads no data rows (trl's sampler reshuffles the prompts every "
                             "epoch with train.seed); remove the key")
        return self


@dataclass
class GRPOTask:
    init_path: str
    visual_tokenizer: VisualTokenizerConfig  # what init decodes with (a release's is given, not in its folder)
    grid: tuple[int, int]
    train_prompts: list[str]
    eval_prompts: list[str]
    rewards: list[dict]
    sampling: SamplingSpec  # the rollouts', complete
    defaults: SamplingSpec  # what its checkpoints record, complete
    grpo: GRPOSpec
    eval: EvalSpec
    samples: SampleSpec | None
    max_text_tokens: int | None
    stage: str = "grpo"

