"""GRPO: reinforcement learning on image rewards from the SFT checkpoint (the body: `simplear.grpo`)."""

from __future__ import annotations

from simplear.grpo.config import GRPOStageConfig
from simplear.grpo.stage import run_grpo_stage
from simplear.t2i import train_progress
from simplear.train import TRAIN_OPERATIONAL
from simplear.workflow import StageContext, StageResult, register_stage


@register_stage("grpo", GRPOStageConfig, version=2, operational=TRAIN_OPERATIONAL, progress=train_progress,
                object_store=True)
def run(ctx: StageContext) -> StageResult:
    return run_grpo_stage(ctx)
