"""The workflow engine: a typed workflow.yaml, a registry of stage kinds, manifests and a DAG runner on Ray."""

from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.registry import StageKind, get_stage_kind, register_stage
from simplear.workflow.spec import ResolvedStage, ResolvedWorkflow, load_workflow

__all__ = [
    "StageContext",
    "StageResult",
    "StageKind",
    "get_stage_kind",
    "register_stage",
    "ResolvedStage",
    "ResolvedWorkflow",
    "load_workflow",
]
