"""The eval stage's body: every checkpoint draws every prompt set (same seeds for all), every set's scorers
judge the images, and one report compares the checkpoints side by side."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from simplear.config import ConfigError
from simplear.evaluation.config import CheckpointSpec, EvalStageConfig
from simplear.evaluation.generate import IMAGES, KEY, Checkpoint, SetPlace, scoring_inputs, set_key, take_back, todo
from simplear.evaluation.prompts import load_items
from simplear.evaluation.protocol import BENCHMARK_SAMPLING, FIGURES_SOURCE, IMAGE_SIZE, REFERENCE_FIGURES
from simplear.evaluation.report import REPORT_HTML, REPORT_JSON, write_report
from simplear.evaluation.workers import DrawJob, ScoreJob, draw_all, score_all
from simplear.storage import join
from simplear.workflow.names import file_name

RECORDS = 2  # the format of a scorer's records and aggregate: a cached score of another format is scored again

NOTES = ["Same prompts and seeds for every checkpoint: image j of prompt i has seed + i x samples_per_prompt + j.",
         "geneval: GenEval's rules with a transformers Mask2Former and open_clip, not the official mmdet scorer "
         "(agreement with it was not measured here); dpg: DPG-Bench's questions answered by a Qwen2-VL judge, "
         "not the official mPLUG judge."]


def resolve_checkpoints(ctx, cfg: EvalStageConfig, where: str) -> list[Checkpoint]:
    from simplear.model import checkpoint_meta
    from simplear.evaluation.protocol import release_name
    from simplear.sampling.spec import recorded_sampling
    from simplear.t2i import has_final_checkpoint
    from simplear.train import FINAL
    from simplear.visual_tokenizers import VisualTokenizerConfig
    from simplear.vocab import META_FILE

    specs = cfg.checkpoints
    if specs is None:
        specs = [CheckpointSpec(stage=n) for n in ctx.needs if has_final_checkpoint(ctx.input_manifest(n))]
        if not specs:
            raise ConfigError(f"{where}.checkpoints: none given and no needed stage has a {FINAL}/ checkpoint")
    out = []
    for i, spec in enumerate(specs):
        if spec.stage is not None:
            if spec.stage not in ctx.needs:
                raise ConfigError(f"{where}.checkpoints[{i}].stage: {spec.stage!r} is not among the stage's needs {ctx.needs}")
            manifest = ctx.input_manifest(spec.stage)
            path, key = ctx.store.child(join(spec.stage, FINAL)), f"stage:{manifest['fingerprint']}"
            trained_grid = manifest.get("metrics", {}).get("grid")
            meta = ctx.store.read_json(join(spec.stage, FINAL, META_FILE))
            if meta is None:
                raise ConfigError(f"{where}.checkpoints[{i}]: {path} is not a SimpleAR checkpoint (no {META_FILE})")
        else:
            folder = ctx.config_path(spec.path)
            path, trained_grid = str(folder), None
            key = "folder:" + _weights_digest(folder, f"{where}.checkpoints[{i}].path")
            try:  # a release as published with its `visual_tokenizer`, checked against the folder
                meta = checkpoint_meta(folder, spec.visual_tokenizer)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"{where}.checkpoints[{i}]: {e}") from None
        vt = VisualTokenizerConfig.model_validate(meta["visual_tokenizer"])
        d = vt.downsample
        if spec.size is not None:
            h, w = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size
            if h % d or w % d:
                raise ConfigError(f"{where}.checkpoints[{i}].size: {h}x{w} is not a multiple of the tokenizer's {d} px")
            grid = (h // d, w // d)
        elif trained_grid:
            grid = tuple(trained_grid)
        else:
            raise ConfigError(f"{where}.checkpoints[{i}]: stage {spec.stage!r} recorded no training grid; give `size`")
        name = spec.name or spec.stage or file_name(Path(path).name)
        source = ((meta.get("extra") or {}).get("release") or {}).get("source")  # a release, as published or imported
        out.append(Checkpoint(name=name, path=path, grid=grid, visual_tokenizer=vt, key=key,
                              sampling=cfg.sampling.over(recorded_sampling(meta)),
                              release=release_name(source) if source else None))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.checkpoints: names must be unique, got {names} (set `name`)")
    return out


def protocol_entry(spec, checkpoints: list[Checkpoint]) -> dict:
    """A protocol set's line in the report: the protocol, its settings, and the published figure of every checkpoint
    that is a release, beside ours (a size other than the protocol's is said)."""
    if spec.protocol is None:
        return {}
    kinds = [sc.kind for sc in spec.scorers if sc.kind in ("geneval", "dpg")]
    reference = {k: {ck.name: {"release": ck.release, "figure": REFERENCE_FIGURES[ck.release][k], "source": FIGURES_SOURCE}
                     for ck in checkpoints if ck.release} for k in kinds}
    sizes = {ck.name: list(ck.size) for ck in checkpoints if tuple(ck.size) != (IMAGE_SIZE, IMAGE_SIZE)}
    return {"protocol": {**spec.protocol.model_dump(mode="json"), "sampling": BENCHMARK_SAMPLING.model_dump(mode="json"),
                         "not_at_its_size": sizes},
            "reference": reference}


def _weights_digest(path: Path, where: str) -> str:
    if not path.is_dir():
        raise ConfigError(f"{where}: {path} not found")
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def score_job(sc_cfg, set_name: str, place: SetPlace, items, per_prompt: int, grids: bool):
    """(cached aggregate, None) when this scorer already judged these very images, else (None, the job that
    scores them). A scorer's records (GenEval's results.jsonl, ...) and aggregate live under `scores/<kind>/`."""
    store = place.store
    key = {"scorer": sc_cfg.model_dump(mode="json"), "images": store.read_json(place.key(KEY)), "records": RECORDS}
    cache = place.key(f"scores/{sc_cfg.kind}/aggregate.json")
    cached = store.read_json(cache)
    if cached and cached.get("key") == key:
        return cached["aggregate"], None
    keys, per_image = scoring_inputs(place, items, per_prompt, grids)
    return None, ScoreJob(pool=f"{set_name}/{sc_cfg.kind}", config=sc_cfg, keys=keys, items=per_image, cache=cache, key=key)


def run_eval_stage(ctx):
    from simplear.workflow.context import StageResult

    cfg: EvalStageConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    checkpoints = resolve_checkpoints(ctx, cfg, where)
    if cfg.engine == "vllm" and any(ck.sampling.mode == "reference" for ck in checkpoints):
        raise ConfigError(f"{where}.sampling.mode: the reference mode runs on the torch engine only (engine: torch)")
    sets = {s.name: (s, *load_items(ctx, s, f"{where}.prompt_sets[{i}]")) for i, s in enumerate(cfg.prompt_sets)}
    run, store = ctx.store.uri, ctx.store
    work, entries = [], {}  # entries: the manifest entries of the images known without reading them again
    for ck in checkpoints:
        jobs = []
        for name, (spec, items, requests) in sets.items():
            sampling = BENCHMARK_SAMPLING if spec.protocol else ck.sampling
            key = set_key(ck, items, sampling, cfg.seed, cfg.samples_per_prompt, cfg.engine,
                          requests if spec.protocol else None)
            place = SetPlace.of(run, ctx.name, ck, name)
            entries.update(take_back(place, key))
            if store.read_json(place.key(KEY)) != key or todo(place, items):
                jobs.append(DrawJob(set_name=name, items=items, place=place, key=key, grids=spec.grids,
                                    sampling=sampling, requests=requests))
        if jobs:
            work.append((ck, jobs))
    workers: dict = {}  # where each task and actor ran, and on what
    drawn = draw_all(cfg, ctx.resources, ctx.name, work, workers, entries) if work else {}

    scores, jobs = {}, []
    for name, (spec, items, _) in sets.items():
        for sc_cfg in spec.scorers:
            for ck in checkpoints:
                cached, job = score_job(sc_cfg, name, SetPlace.of(run, ctx.name, ck, name), items, cfg.samples_per_prompt,
                                        spec.grids)
                if job is None:
                    scores[name, sc_cfg.kind, ck.name] = cached
                else:
                    jobs.append(((name, sc_cfg.kind, ck.name), job))
    if jobs:
        got = score_all([j for _, j in jobs], run, ctx.resources, ctx.name, workers)
        scores.update({where_: got[n] for n, (where_, _) in enumerate(jobs)})

    report = {"checkpoints": [{"name": c.name, "path": c.path, "size": list(c.size),
                               "sampling": c.sampling.model_dump(mode="json")} for c in checkpoints],
              "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
              "engine": cfg.engine, "sets": {}, "notes": NOTES}
    metrics: dict = {"drawn_prompts": drawn, "workers": workers}
    for name, (spec, items, _) in sets.items():
        entry = {"prompts": len(items), "scores": {}, "grids": [], **protocol_entry(spec, checkpoints)}
        for sc_cfg in spec.scorers:
            by_ck = entry["scores"][sc_cfg.kind] = {ck.name: scores[name, sc_cfg.kind, ck.name] for ck in checkpoints}
            for ck in checkpoints:
                metrics[f"{name}_{sc_cfg.kind}_{ck.name}"] = (by_ck[ck.name].get("overall") or {}).get("mean")
        for i, item in enumerate(items[: cfg.grid_prompts]):
            entry["grids"].append({"prompt": item.prompt, "images": {
                ck.name: [f"{IMAGES}/{ck.name}/{name}/{i:05d}/samples/{j:04d}.png" for j in range(cfg.samples_per_prompt)]
                for ck in checkpoints}})
        report["sets"][name] = entry
    write_report(store, ctx.name, report)
    ctx.log.debug("%s: %s", ctx.name, json.dumps(metrics))  # the engine's `done` line gives the key figures
    return StageResult(metrics=metrics, outputs=None, files=entries, artifacts=[REPORT_HTML, REPORT_JSON])
