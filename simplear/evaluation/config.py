"""The eval stage's settings: which checkpoints, which prompt sets (each with its scorers), how images are drawn."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from simplear.config import StrictModel
from simplear.evaluation.protocol import IMAGES_PER_PROMPT, ReferenceProtocol
from simplear.sampling.spec import SamplingSpec
from simplear.scorers import ScorerConfig
from simplear.visual_tokenizers import DECODE_BATCH, VisualTokenizerConfig
from simplear.vllm_engine import VLLMOptions
from simplear.workflow.names import NAME


class CheckpointSpec(StrictModel):
    """A checkpoint to evaluate: a needed training stage's final/ (its training resolution by default) or a folder."""

    stage: str | None = None
    path: str | None = None  # relative to workflow.yaml
    name: str | None = Field(None, pattern=NAME, description="in the report and the folders (a folder's name, so "
                             "letters, digits, '_', '.', '-'); default: the stage's name or the folder's")
    size: int | tuple[int, int] | None = Field(None, description="pixels (square, or [height, width]); default: the "
                                               "training stage's image size (a folder needs it)")
    visual_tokenizer: VisualTokenizerConfig | None = Field(
        None, exclude_if=lambda v: v is None,  # unset: the config (and its fingerprint) as before it existed
        description="a folder that is a released checkpoint as published: the visual tokenizer it decodes with")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.stage is None) == (self.path is None):
            raise ValueError("a checkpoint is either `stage` (a needed training stage) or `path` (a folder)")
        if self.path is not None and self.size is None:
            raise ValueError(f"checkpoint {self.path}: a folder needs `size`")
        return self


class PromptSetSpec(StrictModel):
    """Prompts and the scorers that judge their images. Layouts are the public scorers': GenEval's
    `<5-digit prompt>/samples/<4-digit image>.png` + `metadata.jsonl` for every set, and for `dpg` also
    one 2x2 grid per prompt, `grids/<item_id>.png`."""

    name: str = Field(pattern=NAME, description="the set's folder under each checkpoint's images")
    source: Literal["demo_held_out", "geneval", "dpg", "list", "file"]
    dataset: str | None = None  # demo_held_out: the generated data set whose `held_out` combinations are asked for
    path: str | None = None  # geneval: evaluation_metadata.jsonl; dpg: dpg_bench.csv; file: .txt (one prompt a line)
    items: list[str] | None = None  # list
    max_prompts: int | None = Field(None, ge=1, description="the first prompts only (a quick look at a big set)")
    scorers: list[ScorerConfig] = Field(min_length=1)
    protocol: ReferenceProtocol | None = Field(
        None, exclude_if=lambda v: v is None,
        description="`simplear`: draw as the reference benchmark scripts do (their style prefixes and negative "
                    "prompts per prompt, CFG 6, temperature 1, all codes, 4 images), not with the checkpoints' "
                    "defaults; simplear.evaluation.protocol")

    @property
    def grids(self) -> bool:
        """DPG-Bench scores one 2x2 grid per prompt."""
        return self.source == "dpg"

    @model_validator(mode="after")
    def _needs(self):
        need = {"demo_held_out": "dataset", "geneval": "path", "dpg": "path", "file": "path", "list": "items"}[self.source]
        if not getattr(self, need):
            raise ValueError(f"prompt set {self.name!r}: source {self.source!r} needs `{need}`")
        kinds = [sc.kind for sc in self.scorers]
        if len(set(kinds)) != len(kinds):  # a scorer's records and cache are kept under its kind
            raise ValueError(f"prompt set {self.name!r}: one scorer of each kind, got {kinds}")
        return self


class EvalStageConfig(StrictModel):
    checkpoints: list[CheckpointSpec] | None = None  # default: the final/ of every needed stage that has one
    prompt_sets: list[PromptSetSpec] = Field(min_length=1)
    samples_per_prompt: int = Field(4, ge=1, description="images per prompt (GenEval and DPG-Bench use 4)")
    seed: int = Field(0, description="image j of prompt i gets seed + i * samples_per_prompt + j, for every checkpoint")
    sampling: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="keys left out: each checkpoint's recorded defaults (a release: the "
                                               "reference inference settings)")
    batch_size: int = Field(32, ge=1, description="images per engine call")
    decode_batch: int = Field(DECODE_BATCH, ge=1, description="1024x1024 images per visual-tokenizer decode call (more "
                                                               "of smaller ones): bounds the decoder's memory")
    engine: Literal["torch", "vllm"] = "torch"
    vllm: VLLMOptions = VLLMOptions()
    device: str = "auto"  # torch engine and scorers: cuda when the task has a GPU
    grid_prompts: int = Field(8, ge=0, description="prompts of each set shown as image grids in the report")

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.prompt_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt_sets: names must be unique, got {names}")
        if any(s.source == "dpg" for s in self.prompt_sets) and self.samples_per_prompt != 4:
            raise ValueError("samples_per_prompt: a dpg set is scored on a 2x2 grid, so it needs 4")
        if any(s.protocol for s in self.prompt_sets) and self.samples_per_prompt != IMAGES_PER_PROMPT:
            raise ValueError(f"samples_per_prompt: the simplear protocol draws {IMAGES_PER_PROMPT} images per prompt")
        return self


# keys that change speed or memory, never an image or a score (a batch's composition does not change a request's
# draws: each request has its own uniforms)
EVAL_OPERATIONAL = ("batch_size", "decode_batch", "vllm.max_num_seqs", "vllm.kv_cache_gib", "vllm.gpu_memory_utilization",
                    "vllm.enforce_eager", "vllm.in_process")
