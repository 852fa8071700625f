"""Evaluation scorers behind one interface (`simplear.scorers.base`): GenEval, DPG-Bench, CLIP score, HPS and
the demo's shapes. Model code loads only when a scorer is built."""

from simplear.scorers.base import (
    ClipScoreConfig,
    DpgConfig,
    EvalItem,
    GenEvalConfig,
    HpsScoreConfig,
    RewardScorer,
    Scorer,
    ScorerConfig,
    ShapesConfig,
    build_scorer,
    items_from_prompts,
)

__all__ = ["ClipScoreConfig", "DpgConfig", "EvalItem", "GenEvalConfig", "HpsScoreConfig", "RewardScorer", "Scorer",
           "ScorerConfig", "ShapesConfig", "build_scorer", "items_from_prompts"]
