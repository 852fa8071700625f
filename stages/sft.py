"""SFT: the pretrain loop again, from pretrain's final checkpoint, at a higher resolution on its own data set."""

from __future__ import annotations

import json

from simplear.storage.staging import local_folder
from simplear.t2i import T2IStageConfig, resolve_init, run_t2i_stage, tokenized_data, train_progress
from simplear.train import TRAIN_OPERATIONAL
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import META_FILE
from simplear.workflow import StageContext, StageResult, register_stage


class SFTConfig(T2IStageConfig):
    init: str = "pretrain"  # a stage this one needs (its final checkpoint) or a checkpoint folder


@register_stage("sft", SFTConfig, version=2, operational=TRAIN_OPERATIONAL, progress=train_progress, object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: SFTConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    checkpoint = resolve_init(ctx, cfg.init, where)
    data = tokenized_data(ctx, cfg.data, where)
    vt = VisualTokenizerConfig.model_validate(json.loads((local_folder(checkpoint) / META_FILE).read_text())["visual_tokenizer"])
    return run_t2i_stage(ctx, dict(checkpoint=checkpoint), vt, data)
