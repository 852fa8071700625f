"""Pretrain: next-token training on caption + visual tokens, from an LLM (production) or a tiny config (demo).

The loop, checkpoints, resume and figures are `simplear.train`'s; this stage says how the model
starts (`init`) and which visual tokenizer its vocabulary is built for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simplear.config import ConfigError
from simplear.t2i import T2IStageConfig, run_t2i_stage, tokenized_data, train_progress
from simplear.train import TRAIN_OPERATIONAL
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.workflow import StageContext, StageResult, register_stage


class PretrainConfig(T2IStageConfig):
    init: str = "tiny"  # "tiny" (random TINY_QWEN2) or a causal LLM: hub id or local folder (embeddings resized, new rows = mean)
    text_tokenizer: str | None = None  # default: the built-in tiny BPE for "tiny", else the LLM's own tokenizer
    model: dict[str, Any] = {}  # model config overrides, e.g. a smaller tiny model's hidden_size
    visual_tokenizer: VisualTokenizerConfig | None = None  # default: the one the data stage recorded


@register_stage("pretrain", PretrainConfig, version=3, operational=TRAIN_OPERATIONAL, progress=train_progress,
                object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: PretrainConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    data = tokenized_data(ctx, cfg.data, where)
    vt = cfg.visual_tokenizer
    if vt is None:
        if data.visual_tokenizer is None:
            raise ConfigError(f"{where}.visual_tokenizer: not set, and stage {cfg.data.stage!r} recorded none in its manifest")
        vt = VisualTokenizerConfig.model_validate(data.visual_tokenizer)
    if cfg.init != "tiny" and cfg.init.startswith((".", "/")) and not Path(cfg.init).is_dir():
        raise ConfigError(f"{where}.init: LLM folder {cfg.init} not found")
    init = dict(model_init=cfg.init, text_tokenizer=cfg.text_tokenizer, model_overrides=cfg.model)
    return run_t2i_stage(ctx, init, vt, data)
