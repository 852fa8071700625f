"""SFT: the pretrain loop again, from pretrain's final checkpoint, at a higher resolution on its own data set."""

from __future__ import annotations

from pydantic import Field

from simplear.t2i import T2IStageConfig, resolve_init, run_t2i_stage, tokenized_data, train_progress
from simplear.train import TRAIN_OPERATIONAL
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.workflow import StageContext, StageResult, register_stage


class SFTConfig(T2IStageConfig):
    init: str = "pretrain"  # a stage this one needs (its final checkpoint) or a checkpoint folder
    visual_tokenizer: VisualTokenizerConfig | None = Field(
        None, exclude_if=lambda v: v is None,  # unset: the config (and its fingerprint) as before it existed
        description="`init` is a released checkpoint as published (it names none): the visual tokenizer it "
                          "decodes with, e.g. {kind: cosmos, path: Cosmos-1.0-Tokenizer-DV8x16x16}")


@register_stage("sft", SFTConfig, version=2, operational=TRAIN_OPERATIONAL, progress=train_progress, object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: SFTConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    init = resolve_init(ctx, cfg.init, where, cfg.visual_tokenizer)
    data = tokenized_data(ctx, cfg.data, where)
    return run_t2i_stage(ctx, dict(checkpoint=init.location), init.visual_tokenizer, data)
