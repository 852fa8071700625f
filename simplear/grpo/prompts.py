"""GRPO's prompts: from a needed stage's kept Parquet (one resolution, never `rejected/`), a file or a list."""

from __future__ import annotations

import random

from simplear.config import ConfigError
from simplear.grpo.config import PromptSpec


def resolve_prompts(ctx, spec: PromptSpec, where: str) -> tuple[list[str], list[str]]:
    """(train, eval) distinct prompts: shuffled with the seed, the first `eval_count` held out."""
    import pyarrow.parquet as pq

    found: list[str] = []
    if spec.source == "list":
        found = list(spec.items)
    elif spec.source == "stage":
        if spec.stage not in ctx.needs:
            raise ConfigError(f"{where}.prompts.stage: {spec.stage!r} is not among the stage's needs {ctx.needs}")
        rels = [o["path"] for o in ctx.input_manifest(spec.stage)["outputs"]
                if o["path"].endswith(".parquet") and o["path"].split("/")[0] != "rejected"]
        if spec.resolution is not None:
            rels = [r for r in rels if r.split("/")[0] == str(spec.resolution)]
        if not rels:
            raise ConfigError(f"{where}.prompts.stage: stage {spec.stage!r} recorded no kept Parquet outputs"
                              + (f" under {spec.resolution}/" if spec.resolution is not None else ""))
        fs = ctx.filesystem  # the run dir's: the files may lie on object storage
        for rel in rels:
            f = ctx.input_path(spec.stage, rel)
            if spec.column not in pq.read_schema(f, filesystem=fs).names:
                raise ConfigError(f"{where}.prompts.column: {spec.stage}/{rel} has no column {spec.column!r}")
            found += [c for c in pq.read_table(f, columns=[spec.column], filesystem=fs)[spec.column].to_pylist()]
            if spec.max_prompts and len(set(found)) >= spec.max_prompts:
                break
    else:
        path = ctx.config_path(spec.path)
        if not path.is_file():
            raise ConfigError(f"{where}.prompts.path: {path} not found")
        if path.suffix == ".parquet":
            found = pq.read_table(path, columns=[spec.column])[spec.column].to_pylist()
        else:
            found = path.read_text().splitlines()
    prompts = list(dict.fromkeys(p.strip() for p in found if isinstance(p, str) and p.strip()))
    if spec.max_prompts:
        prompts = prompts[: spec.max_prompts]
    random.Random(spec.seed).shuffle(prompts)
    if len(prompts) <= spec.eval_count:
        raise ConfigError(f"{where}.prompts: {len(prompts)} distinct prompts, not more than eval_count {spec.eval_count}")
    return prompts[spec.eval_count:], prompts[: spec.eval_count]

