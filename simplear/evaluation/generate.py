"""Images of a prompt set from one checkpoint, in GenEval's layout, resumable per prompt and reusable across runs.

    images/<checkpoint>/<set>/key.json                what these images are (checkpoint, size, sampling, seeds, prompts)
    images/<checkpoint>/<set>/<00000>/samples/<0000>.png
    images/<checkpoint>/<set>/<00000>/metadata.jsonl  written last: the prompt is done
    images/<checkpoint>/<set>/grids/<item_id>.png     a dpg set: the 2x2 grid DPG-Bench scores

A rerun of the stage (e.g. because GRPO trained again) finds its earlier images in `.previous/`
(where the engine moved them) and takes back, by rename, every (checkpoint, set) whose key is
unchanged, so only the checkpoints that changed are drawn again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from simplear.evaluation.config import EvalSampling
from simplear.scorers import EvalItem
from simplear.scorers.dpg import make_grid
from simplear.visual_tokenizers import VisualTokenizerConfig, tensor_to_pil
from simplear.workflow.manifest import atomic_path, atomic_write_json, read_json
from simplear.workflow.names import file_name
from simplear.workflow.previous import PREVIOUS

log = logging.getLogger("simplear.eval")

IMAGES = "images"
KEY = "key.json"
DONE = "metadata.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    grid: tuple[int, int]  # codes per column and row
    visual_tokenizer: VisualTokenizerConfig  # what decodes its codes (from its simplear.json)
    key: str  # what the weights are: the training stage's fingerprint, or the folder's weights files

    @property
    def size(self) -> tuple[int, int]:
        d = self.visual_tokenizer.downsample
        return self.grid[0] * d, self.grid[1] * d


def image_seed(seed: int, index: int, j: int, per_prompt: int) -> int:
    return seed + index * per_prompt + j


def set_key(ck: Checkpoint, items: list[EvalItem], sampling: EvalSampling, seed: int, per_prompt: int, engine: str) -> dict:
    prompts = hashlib.sha256(json.dumps([i.prompt for i in items]).encode()).hexdigest()
    return {"checkpoint": ck.key, "grid": list(ck.grid), "sampling": sampling.model_dump(mode="json"), "seed": seed,
            "samples_per_prompt": per_prompt, "prompts": prompts, "engine": engine}


def set_dir(stage_dir: Path, ck: Checkpoint, set_name: str) -> Path:
    return stage_dir / IMAGES / ck.name / set_name


def take_back(stage_dir: Path, ck: Checkpoint, set_name: str, key: dict) -> bool:
    """Move an earlier run's images of this (checkpoint, set) back in place when their key is this one."""
    here = set_dir(stage_dir, ck, set_name)
    if here.exists():
        return False
    earlier = sorted((stage_dir / PREVIOUS).glob(f"*/{IMAGES}/{ck.name}/{set_name}/{KEY}"), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    for found in earlier:
        if read_json(found) == key:
            here.parent.mkdir(parents=True, exist_ok=True)
            os.rename(found.parent, here)
            done = sum(1 for _ in here.glob(f"*/{DONE}"))
            log.info("%s/%s: took back %d prompts' images from %s (same checkpoint, sampling and seeds)", ck.name, set_name,
                     done, found.parent.relative_to(stage_dir))
            return True
    return False


def todo(folder: Path, items: list[EvalItem]) -> list[tuple[int, EvalItem]]:
    """(position, item) of the prompts whose done marker is missing."""
    done = {int(p.parent.name) for p in folder.glob(f"*/{DONE}") if p.parent.name.isdigit()}
    return [(i, it) for i, it in enumerate(items) if i not in done]


def generate_set(engine, visual_tokenizer, ck: Checkpoint, items: list[EvalItem], folder: Path, key: dict,
                 sampling: EvalSampling, seed: int, per_prompt: int, batch_size: int, grids: bool) -> int:
    """Draw the prompts not done yet; returns how many were drawn now."""
    if read_json(folder / KEY) not in (None, key):  # the same fingerprint with other images cannot happen; be loud
        raise RuntimeError(f"{folder}: holds images of another key ({folder / KEY}); move it away to draw again")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / KEY, key)
    pending = todo(folder, items)
    prompts_per_call = max(1, batch_size // per_prompt)
    for b in range(0, len(pending), prompts_per_call):
        chunk = pending[b: b + prompts_per_call]
        requests = [(i, it, j) for i, it in chunk for j in range(per_prompt)]
        params = [sampling.params(image_seed(seed, i, j, per_prompt)) for i, _, j in requests]
        codes = engine.generate_codes([it.prompt for _, it, _ in requests], ck.grid, params)
        images = [tensor_to_pil(t) for t in visual_tokenizer.decode(codes)]
        for n, (i, it) in enumerate(chunk):
            write_prompt(folder, i, it, images[n * per_prompt: (n + 1) * per_prompt], grids)
        log.info("%s/%s: %d / %d prompts drawn", ck.name, folder.name, len(items) - len(pending) + b + len(chunk), len(items))
    return len(pending)


def grid_path(folder: Path, item: EvalItem) -> Path:
    """DPG-Bench's grid of an item, named after its id (an id from the benchmark file: made a safe name)."""
    return folder / "grids" / f"{file_name(str(item.id))}.png"


def write_prompt(folder: Path, index: int, item: EvalItem, images: list, grid: bool) -> None:
    d = folder / f"{index:05d}"
    (d / "samples").mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        with atomic_path(d / "samples" / f"{j:04d}.png") as tmp:
            img.save(tmp, format="PNG")
    if grid:  # DPG-Bench scores one 2x2 grid per prompt, named after the prompt's file
        with atomic_path(grid_path(folder, item)) as tmp:
            make_grid(images).save(tmp, format="PNG")
    with atomic_path(d / DONE) as tmp:  # GenEval's metadata line (DPG's questions are in its csv)
        meta = {k: v for k, v in item.metadata.items() if k != "questions"}
        Path(tmp).write_text(json.dumps({**meta, "prompt": item.prompt}) + "\n")


def scoring_inputs(folder: Path, items: list[EvalItem], per_prompt: int, grids: bool) -> tuple[list[str], list[EvalItem]]:
    """(image paths, one item each) as the set's scorers read them: every sample named as in GenEval's layout, or
    (a dpg set) each prompt's 2x2 grid named by its item id."""
    if grids:
        return [str(grid_path(folder, it)) for it in items], list(items)
    paths, per_image = [], []
    for i, it in enumerate(items):
        for j in range(per_prompt):
            name = f"{i:05d}/samples/{j:04d}.png"
            paths.append(str(folder / name))
            per_image.append(EvalItem(prompt=it.prompt, id=name, metadata=it.metadata))
    return paths, per_image
