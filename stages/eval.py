"""Eval: GenEval / DPG-Bench / CLIP / HPS / the demo's shapes across checkpoints (the body: `simplear.evaluation`)."""

from __future__ import annotations

from simplear.evaluation.config import EVAL_OPERATIONAL, EvalStageConfig
from simplear.evaluation.stage import run_eval_stage
from simplear.workflow import StageContext, StageResult, register_stage


@register_stage("eval", EvalStageConfig, version=1, operational=EVAL_OPERATIONAL, object_store=True)
def run(ctx: StageContext) -> StageResult:
    return run_eval_stage(ctx)
