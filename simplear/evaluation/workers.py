"""The eval stage's work on the stage's `resources` (its GPUs): the stage's own Ray task holds none, so drawing
and scoring run in tasks and actors that ask for them.

- Drawing: one task per checkpoint (its engine loads once and draws every set), at most `concurrency` at once.
- Scoring: one pool of `concurrency` actors per (prompt set, scorer), every pool at once, so GenEval's detector,
  the DPG judge and the CLIP models each sit on their own GPUs; an actor loads its models once and reads the
  images from the run dir's store (a shared folder or a bucket), so no image travels through Ray's object store. A pool
  ends as soon as its last result is in, which frees its GPUs for the pools still waiting for theirs: nothing
  waits on an actor that may not be placed yet, so fewer GPUs than pools is slower, never stuck (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from simplear.evaluation.generate import SetPlace
from simplear.evaluation.protocol import DrawRequest
from simplear.sampling.spec import SamplingSpec
from simplear.scorers import EvalItem
from simplear.storage import join, open_store
from simplear.workflow.manifest import commit_json, committed

log = logging.getLogger("simplear.eval")

IMAGES_PER_CALL = 64  # one actor call's images: a pool spreads a set's images over its actors in these


def placement() -> dict:
    """Where this task or actor runs and what Ray gave it, for the stage's metrics: proof that the work sat on the
    stage's resources (its GPUs), which a CPU-only run in the stage's own task would not show."""
    import ray

    rc = ray.get_runtime_context()
    return {"node": rc.get_node_id()[:12], "resources": rc.get_assigned_resources(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def open_engine(cfg, ck, device):
    """(engine with `generate_codes`, visual tokenizer) for one checkpoint: bf16 on a GPU, fp32 elsewhere."""
    from simplear.devices import resolve_serving_dtype
    from simplear.storage.staging import local_folder
    from simplear.visual_tokenizers import load_visual_tokenizer

    vt = load_visual_tokenizer(ck.visual_tokenizer, device, decode_batch=cfg.decode_batch)
    folder = local_folder(ck.path)  # a checkpoint on a bucket: fetched once per node
    if cfg.engine == "vllm":
        from simplear.model import checkpoint_meta
        from simplear.vllm_engine import VLLMSampler

        meta = checkpoint_meta(folder, ck.visual_tokenizer)  # a release's: described for the tokenizer it was given
        return VLLMSampler(folder, vt, cfg.vllm, max_image_tokens=ck.grid[0] * ck.grid[1], meta=meta), vt
    from simplear.model import load_checkpoint
    from simplear.sampler import TorchSampler

    loaded = load_checkpoint(folder, device=device, dtype=resolve_serving_dtype("auto", device),
                             visual_tokenizer=ck.visual_tokenizer)
    loaded.model.eval()
    return TorchSampler(loaded.model, loaded.vocab, device=device), vt


@dataclass(frozen=True)
class DrawJob:
    set_name: str
    items: list[EvalItem]
    place: SetPlace
    key: dict
    grids: bool
    sampling: SamplingSpec  # complete: the checkpoint's, or a protocol's
    requests: list[DrawRequest]  # what the engine is asked for each item


def draw_checkpoint(cfg, ck, jobs: list[DrawJob]) -> tuple[dict[str, int], dict[str, dict], dict]:
    """A Ray task: the checkpoint's engine draws each set's missing prompts; ({set: prompts drawn now}, manifest
    entries of the files written, placement)."""
    from simplear.devices import resolve_device
    from simplear.evaluation.generate import generate_set
    from simplear.train.sessions import setup_worker_logging

    setup_worker_logging()
    device = resolve_device(cfg.device)
    engine, vt = open_engine(cfg, ck, device)
    log.info("%s: drawing %s on %s", ck.name, ", ".join(j.set_name for j in jobs), device)
    drawn, entries = {}, {}
    for j in jobs:
        drawn[j.set_name], written = generate_set(engine, vt, ck, j.items, j.place, j.key, j.sampling, cfg.seed,
                                                  cfg.samples_per_prompt, cfg.batch_size, j.grids, j.requests)
        entries.update(written)
    return drawn, entries, {**placement(), "device": str(device)}


def draw_all(cfg, resources, stage: str, work: list[tuple[Any, list[DrawJob]]], workers: dict,
             entries: dict) -> dict[str, int]:
    """Every (checkpoint, its sets to draw) through `draw_checkpoint`; {"<checkpoint>/<set>": prompts drawn}.
    `workers` gets each task's placement under its name, `entries` the manifest entries of the files written."""
    import ray

    # max_calls=1: the worker exits after its checkpoint, and the GPU memory its engine held goes with it (Ray sets
    # this itself only for a function declared with GPUs, not for one given them by .options)
    remote = ray.remote(max_calls=1)(draw_checkpoint)
    waiting, running, drawn = list(work), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < resources.concurrency:
                ck, jobs = waiting.pop(0)
                ref = remote.options(**resources.ray_options(), max_retries=0, name=f"{stage}:draw:{ck.name}").remote(cfg, ck, jobs)
                running[ref] = ck
            ready, _ = ray.wait(list(running), num_returns=1)
            ck = running.pop(ready[0])
            counts, written, workers[f"draw:{ck.name}"] = ray.get(ready[0])
            entries.update(written)
            drawn.update({f"{ck.name}/{name}": n for name, n in counts.items()})
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
    return drawn


class ScorerWorker:
    """A Ray actor: one scorer, its models loaded once on the actor's device, reading the images from the run dir."""

    def __init__(self, config, run: str):
        from simplear.scorers import build_scorer
        from simplear.train.sessions import setup_worker_logging

        setup_worker_logging()
        self.scorer = build_scorer(config)
        self.run = run

    def placement(self) -> dict:
        return placement()

    def score(self, keys: list[str], items: list[EvalItem]) -> list[dict]:
        import io

        from PIL import Image

        store, images = open_store(self.run), []
        for key in keys:
            blob = store.read(key)
            if blob is None:
                raise FileNotFoundError(f"{store.child(key)}: the image to score is not there")
            with Image.open(io.BytesIO(blob.data)) as im:
                images.append(im.convert("RGB"))
        return self.scorer.score(images, items)

    def finish(self, folder: str, *parts: list[dict]) -> dict:
        """The records of one (checkpoint, set) in the benchmark's format under the key `folder`, and their aggregate."""
        per_image = [r for part in parts for r in part]
        store = open_store(self.run)
        for name, text in self.scorer.records(per_image).items():
            with committed(store, join(folder, name)) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return self.scorer.aggregate(per_image)


@dataclass(frozen=True)
class ScoreJob:
    """One scorer on one checkpoint's images of one set; its aggregate goes to `cache` with `key`."""

    pool: str  # "<set>/<kind>": the jobs of one pool share its scorer config
    config: Any  # a simplear.scorers config
    keys: list[str]  # the images, as keys in the run dir
    items: list[EvalItem]
    cache: str  # the key of scores/<kind>/aggregate.json of the (checkpoint, set); the records go beside it
    key: dict


def score_all(jobs: list[ScoreJob], run: str, resources, stage: str, workers: dict) -> dict[int, dict]:
    """Each job's aggregate (by its position in `jobs`), each written to its cache as it comes in. `workers` gets
    each actor's placement under its name."""
    import ray

    pools: dict[str, list[int]] = {}
    for n, job in enumerate(jobs):
        pools.setdefault(job.pool, []).append(n)
    worker = ray.remote(ScorerWorker)
    actors: dict[str, list] = {}
    finishing: dict[Any, int] = {}
    placements: dict[str, list] = {}  # pool -> its actors' placement calls
    left: dict[str, int] = {}
    out: dict[int, dict] = {}
    try:
        for name, members in pools.items():
            calls = [(n, b) for n in members for b in range(0, len(jobs[n].keys), IMAGES_PER_CALL)]
            size = max(1, min(resources.concurrency, len(calls)))
            log.info("%s: scoring %s: %d images of %d checkpoints on %d actors", stage, name,
                     sum(len(jobs[n].keys) for n in members), len(members), size)
            pool = actors[name] = [worker.options(**resources.ray_options(), max_restarts=0).remote(jobs[members[0]].config, run)
                                   for _ in range(size)]
            placements[name] = [a.placement.remote() for a in pool]
            parts: dict[int, list] = {n: [] for n in members}
            for c, (n, b) in enumerate(calls):
                parts[n].append(pool[c % size].score.remote(jobs[n].keys[b: b + IMAGES_PER_CALL],
                                                           jobs[n].items[b: b + IMAGES_PER_CALL]))
            for i, n in enumerate(members):  # after every score call, so no actor waits on another's queue
                finishing[pool[i % size].finish.remote(jobs[n].cache.rsplit("/", 1)[0], *parts[n])] = n
            left[name] = len(members)
        while finishing:
            ready, _ = ray.wait(list(finishing), num_returns=1)
            n = finishing.pop(ready[0])
            out[n] = ray.get(ready[0])
            commit_json(open_store(run), jobs[n].cache, {"key": jobs[n].key, "aggregate": out[n]})
            left[jobs[n].pool] -= 1
            name = jobs[n].pool
            if not left[name]:  # its actors answered every call, their placements too; free their GPUs
                workers.update({f"score:{name}:{i}": p for i, p in enumerate(ray.get(placements.pop(name)))})
                for actor in actors.pop(name):
                    ray.kill(actor)
    finally:
        for pool in actors.values():
            for actor in pool:
                ray.kill(actor)
    return out
