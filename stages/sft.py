"""SFT: the pretrain loop again, from pretrain's final checkpoint, at a higher resolution on its own data set."""

from __future__ import annotations

import json
from pathlib import Path

from simplear.config import ConfigError
from simplear.model import is_checkpoint
from simplear.t2i import T2IStageConfig, run_t2i_stage, tokenized_data, train_progress
from simplear.train import FINAL, TRAIN_OPERATIONAL
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import META_FILE
from simplear.workflow import StageContext, StageResult, register_stage


class SFTConfig(T2IStageConfig):
    init: str = "pretrain"  # a stage this one needs (its final checkpoint) or a checkpoint folder


def resolve_init(ctx: StageContext, init: str, where: str) -> Path:
    """The checkpoint folder SFT starts from; a wrong or missing one is a ConfigError naming the key."""
    if init in ctx.needs:
        manifest = ctx.input_manifest(init)
        if not any(o["path"].startswith(f"{FINAL}/") for o in manifest["outputs"]):
            raise ConfigError(f"{where}.init: stage {init!r} recorded no {FINAL}/ checkpoint (is it a training stage?)")
        path = ctx.input_dir(init) / FINAL
    else:
        path = Path(init)
        if not path.is_absolute():
            path = ctx.workflow_path.parent / path
        if not path.exists():
            raise ConfigError(f"{where}.init: {init!r} is neither a stage this one needs ({', '.join(ctx.needs)}) "
                              f"nor an existing checkpoint folder ({path} not found)")
    if not path.is_dir() or not is_checkpoint(path):
        raise ConfigError(f"{where}.init: {path} is not a SimpleAR checkpoint (no valid {META_FILE}; "
                          "expected a folder written by a pretrain/sft stage)")
    return path


@register_stage("sft", SFTConfig, version=2, operational=TRAIN_OPERATIONAL, progress=train_progress)
def run(ctx: StageContext) -> StageResult:
    cfg: SFTConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    checkpoint = resolve_init(ctx, cfg.init, where)
    data = tokenized_data(ctx, cfg.data, where)
    vt = VisualTokenizerConfig.model_validate(json.loads((checkpoint / META_FILE).read_text())["visual_tokenizer"])
    return run_t2i_stage(ctx, dict(checkpoint=str(checkpoint)), vt, data)
