"""Images of a prompt set from one checkpoint, in GenEval's layout, resumable per prompt and reusable across runs.

    images/<checkpoint>/<set>/key.json                what these images are (checkpoint, size, sampling, seeds, prompts)
    images/<checkpoint>/<set>/<00000>/samples/<0000>.png
    images/<checkpoint>/<set>/<00000>/metadata.jsonl  written last: the prompt is done
    images/<checkpoint>/<set>/grids/<item_id>.png     a dpg set: the 2x2 grid DPG-Bench scores

Everything goes through the run dir's store (a folder or a bucket) under keys relative to the stage; a draw task
returns the manifest entries of what it wrote, so a bucket's images are not fetched again to be hashed.

A rerun of the stage (e.g. because GRPO trained again) finds its earlier images in `.previous/`
(where the engine moved them) and takes back every (checkpoint, set) whose key is unchanged (a rename on a
folder, a server-side copy on a bucket), with their entries from the earlier manifest, so only the checkpoints
that changed are drawn again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from simplear.evaluation.protocol import DrawRequest
from simplear.sampling.spec import SamplingSpec
from simplear.scorers import EvalItem
from simplear.scorers.dpg import make_grid
from simplear.storage import Store, dump_json, join, open_store
from simplear.visual_tokenizers import VisualTokenizerConfig, tensor_to_pil
from simplear.workflow.manifest import MANIFEST, committed, file_entry
from simplear.workflow.names import file_name
from simplear.workflow.previous import MOVED, PREVIOUS, previous_sets

log = logging.getLogger("simplear.eval")

IMAGES = "images"
KEY = "key.json"
DONE = "metadata.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: str  # a folder, or `<run dir URI>/<stage>/final` (fetched once per node before it is loaded)
    grid: tuple[int, int]  # codes per column and row
    visual_tokenizer: VisualTokenizerConfig  # what decodes its codes (from its simplear.json)
    key: str  # what the weights are: the training stage's fingerprint, or the folder's weights files
    sampling: SamplingSpec  # how it draws here: the stage's `sampling` over the checkpoint's recorded defaults
    release: str | None = None  # the published release it is (simplear.evaluation.protocol.REFERENCE_FIGURES)

    @property
    def size(self) -> tuple[int, int]:
        d = self.visual_tokenizer.downsample
        return self.grid[0] * d, self.grid[1] * d


@dataclass(frozen=True)
class SetPlace:
    """Where one (checkpoint, set)'s images live: the run dir as a path or URI (a Ray task opens its store from
    it), the stage, and the folder in the stage."""

    run: str
    stage: str
    folder: str  # images/<checkpoint>/<set>

    @classmethod
    def of(cls, run: str, stage: str, ck: Checkpoint, set_name: str) -> "SetPlace":
        return cls(run, stage, join(IMAGES, ck.name, set_name))

    @property
    def store(self) -> Store:
        return open_store(self.run)

    def key(self, rel: str = "") -> str:
        """A key in the run dir."""
        return join(self.stage, self.folder, rel)

    def rel(self, rel: str) -> str:
        """A path in the stage, as its manifest names the file."""
        return join(self.folder, rel)


def image_seed(seed: int, index: int, j: int, per_prompt: int) -> int:
    return seed + index * per_prompt + j


def set_key(ck: Checkpoint, items: list[EvalItem], sampling: SamplingSpec, seed: int, per_prompt: int, engine: str,
            requests: list[DrawRequest] | None = None) -> dict:
    """What a (checkpoint, set)'s images are; `requests` when they are not the plain prompts (a protocol's)."""
    digest = lambda v: hashlib.sha256(json.dumps(v).encode()).hexdigest()  # noqa: E731
    key = {"checkpoint": ck.key, "grid": list(ck.grid), "sampling": sampling.model_dump(mode="json"), "seed": seed,
           "samples_per_prompt": per_prompt, "prompts": digest([i.prompt for i in items]), "engine": engine}
    if requests is not None:
        key["requests"] = digest([[r.text, r.negative_prompt] for r in requests])
    return key


def take_back(place: SetPlace, key: dict) -> dict[str, dict]:
    """Move an earlier run's images of this (checkpoint, set) back in place when their key is this one (the newest
    such); returns the manifest entries the earlier run recorded for them, so they are not read again to be hashed."""
    store = place.store
    if store.exists(place.key(KEY)):
        return {}
    earlier = []
    for label in previous_sets(store, place.stage):
        if store.read_json(join(place.stage, PREVIOUS, label, place.folder, KEY)) == key:
            moved = store.read_json(join(place.stage, PREVIOUS, label, MOVED)) or {}
            earlier.append((moved.get("at", 0), label))
    if not earlier:
        return {}
    _, label = max(earlier)
    store.move(join(place.stage, PREVIOUS, label, place.folder), place.key())
    manifest = store.read_json(join(place.stage, PREVIOUS, label, MANIFEST)) or {}
    entries = {o["path"]: o for o in manifest.get("outputs", []) if o.get("path", "").startswith(place.folder + "/")}
    log.info("%s: took back %d prompts' images from %s (same checkpoint, sampling and seeds)", place.folder,
             len(done_prompts(place)), join(place.stage, PREVIOUS, label))
    return entries


def done_prompts(place: SetPlace) -> set[int]:
    """The prompts whose done marker is there."""
    prefix = place.key() + "/"
    done = set()
    for item in place.store.list(place.key()):
        parts = item.key[len(prefix):].split("/")
        if len(parts) == 2 and parts[1] == DONE and parts[0].isdigit():
            done.add(int(parts[0]))
    return done


def todo(place: SetPlace, items: list[EvalItem]) -> list[tuple[int, EvalItem]]:
    """(position, item) of the prompts whose done marker is missing."""
    done = done_prompts(place)
    return [(i, it) for i, it in enumerate(items) if i not in done]


def generate_set(engine, visual_tokenizer, ck: Checkpoint, items: list[EvalItem], place: SetPlace, key: dict,
                 sampling: SamplingSpec, seed: int, per_prompt: int, batch_size: int, grids: bool,
                 requests: list[DrawRequest] | None = None) -> tuple[int, dict[str, dict]]:
    """Draw the prompts not done yet; (how many were drawn now, manifest entries of the files written). `requests`:
    what the engine is asked for each item (default: its prompt, with the set's negative prompt)."""
    requests = requests or [DrawRequest(it.prompt) for it in items]
    store = place.store
    if store.read_json(place.key(KEY)) not in (None, key):  # the same fingerprint with other images cannot happen; be loud
        raise RuntimeError(f"{store.child(place.key())}: holds images of another key ({KEY}); move it away to draw again")
    entries = commit_files(place, KEY, lambda tmp: tmp.write_bytes(dump_json(key)))
    pending = todo(place, items)
    prompts_per_call = max(1, batch_size // per_prompt)
    for b in range(0, len(pending), prompts_per_call):
        chunk = pending[b: b + prompts_per_call]
        asked = [(i, j, requests[i]) for i, _ in chunk for j in range(per_prompt)]
        params = [sampling.params(image_seed(seed, i, j, per_prompt)) for i, j, _ in asked]
        params = [p if r.negative_prompt is None else replace(p, negative_prompt=r.negative_prompt)
                  for p, (_, _, r) in zip(params, asked)]
        codes = engine.generate_codes([r.text for _, _, r in asked], ck.grid, params)
        images = [tensor_to_pil(t) for t in visual_tokenizer.decode(codes)]
        for n, (i, it) in enumerate(chunk):
            entries.update(write_prompt(place, i, it, images[n * per_prompt: (n + 1) * per_prompt], grids))
        log.info("%s: %d / %d prompts drawn", place.folder, len(items) - len(pending) + b + len(chunk), len(items))
    return len(pending), entries


def commit_files(place: SetPlace, rel: str, write: Callable[[Path], object]) -> dict[str, dict]:
    """Commit what `write(tmp)` puts at tmp (a file, or a folder of files) under the set's `rel`, checked against the
    run's fence; the manifest entries of its files, computed from the bytes written."""
    with committed(place.store, place.key(rel)) as tmp:
        write(tmp)
        files = sorted(f for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else [tmp]
        named = [(f, place.rel(rel) if f == tmp else join(place.rel(rel), f.relative_to(tmp).as_posix())) for f in files]
        return {name: file_entry(f, name) for f, name in named}


def grid_rel(item: EvalItem) -> str:
    """DPG-Bench's grid of an item, named after its id (an id from the benchmark file: made a safe name)."""
    return f"grids/{file_name(str(item.id))}.png"


def write_prompt(place: SetPlace, index: int, item: EvalItem, images: list, grid: bool) -> dict[str, dict]:
    d = f"{index:05d}"

    def samples(tmp: Path) -> None:
        tmp.mkdir()
        for j, img in enumerate(images):
            img.save(tmp / f"{j:04d}.png", format="PNG")

    entries = commit_files(place, join(d, "samples"), samples)
    if grid:  # DPG-Bench scores one 2x2 grid per prompt, named after the prompt's file
        entries.update(commit_files(place, grid_rel(item), lambda tmp: make_grid(images).save(tmp, format="PNG")))
    meta = {k: v for k, v in item.metadata.items() if k != "questions"}  # GenEval's metadata line (DPG's are in its csv)
    entries.update(commit_files(place, join(d, DONE), lambda tmp: tmp.write_text(json.dumps({**meta, "prompt": item.prompt}) + "\n")))
    return entries


def scoring_inputs(place: SetPlace, items: list[EvalItem], per_prompt: int, grids: bool) -> tuple[list[str], list[EvalItem]]:
    """(image keys in the run dir, one item each) as the set's scorers read them: every sample named as in
    GenEval's layout, or (a dpg set) each prompt's 2x2 grid named by its item id."""
    if grids:
        return [place.key(grid_rel(it)) for it in items], list(items)
    keys, per_image = [], []
    for i, it in enumerate(items):
        for j in range(per_prompt):
            name = f"{i:05d}/samples/{j:04d}.png"
            keys.append(place.key(name))
            per_image.append(EvalItem(prompt=it.prompt, id=name, metadata=it.metadata))
    return keys, per_image
