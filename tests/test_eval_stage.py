"""The eval stage: held-out demo prompts, GenEval's and DPG-Bench's layouts, resume per prompt, images taken
back after a rerun when their checkpoint did not change, one report across checkpoints."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest
import torch

from simplear.config import ConfigError
from simplear.tiny import TINY_CLIP_NAME
from simplear.workflow.spec import Resources

from test_training import task


def save_stage_checkpoint(store, stage: str, seed: int, scratch: Path, grid=(4, 4)) -> None:
    """A needed training stage as the engine leaves it in the run dir (a folder or a bucket): final/ and a manifest
    with its fingerprint and grid."""
    from simplear.model import save_checkpoint
    from simplear.workflow.manifest import MANIFEST

    torch.manual_seed(seed)
    b = task().build(torch.device("cpu"), None)
    folder = scratch / f"{stage}-{seed}"
    save_checkpoint(folder, b.model, b.vocab, b.visual_tokenizer_config)
    outputs = [{"path": f"final/{p.name}"} for p in sorted(folder.iterdir())]
    store.delete_prefix(f"{stage}/final")
    for p in folder.iterdir():
        store.upload(p, f"{stage}/final/{p.name}")
    store.write_json(f"{stage}/{MANIFEST}", {"fingerprint": f"fp-{stage}-{seed}", "outputs": outputs,
                                              "metrics": {"grid": list(grid)}})


def demo_dataset(tmp_path: Path, held_out: int = 6) -> Path:
    path = tmp_path / "demo_shapes.yaml"
    path.write_text(f"name: demo_shapes\nsource: generated\ngenerator: demo_shapes\ndescription: test\nlicense: CC0-1.0\n"
                    f"params: {{count: 10, held_out: {held_out}}}\n")
    return path


def make_ctx(tmp_path: Path, config: dict, needs=("pretrain", "sft"), resources: Resources = Resources(), run: str | None = None):
    """The eval stage's context over a run dir: `tmp_path/run`, or `run` (a bucket's URI)."""
    from stages.eval import EvalStageConfig  # noqa: F401  (registers the kind)
    from simplear.evaluation.config import EvalStageConfig as Cfg
    from simplear.workflow import StageContext

    local = tmp_path / "run" if run is None else None
    return StageContext(name="eval", kind="eval", config=Cfg.model_validate(config), resources=resources,
                        stage_dir=local and local / "eval", run_dir=local, needs=list(needs), fingerprint="x",
                        dataset_files={"demo_shapes": demo_dataset(tmp_path)}, workflow_path=tmp_path / "workflow.yaml",
                        profile="", run_uri=run)


SETS = [{"name": "held_out", "source": "demo_held_out", "dataset": "demo_shapes", "scorers": [{"kind": "shapes"}]}]


def test_the_demo_set_never_draws_its_held_out_combinations(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.demo_shapes import generate
    from simplear.datasets import DemoShapesParams
    from simplear.demo_captions import caption_for, held_out_combinations

    held = held_out_combinations(60, seed=0)
    assert len(set(held)) == 60 and held == held_out_combinations(60, seed=0) != held_out_combinations(60, seed=1)
    captions = set(pq.read_table(generate(tmp_path / "a", DemoShapesParams(count=400, held_out=60)))["caption"].to_pylist())
    assert not captions & {caption_for(*c) for c in held}
    # without a held-out set, the draws are those of a set made before the parameter existed
    plain = pq.read_table(generate(tmp_path / "b", DemoShapesParams(count=50)))["caption"].to_pylist()
    again = pq.read_table(generate(tmp_path / "c", DemoShapesParams(count=50, held_out=0)))["caption"].to_pylist()
    assert plain == again


def test_prompt_sets_read_geneval_and_dpg_files(tmp_path):
    from simplear.evaluation.config import PromptSetSpec
    from simplear.evaluation.prompts import load_items

    ctx = make_ctx(tmp_path, {"prompt_sets": SETS})
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"})
                    + "\n\n" + json.dumps({"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"}) + "\n")
    items, requests = load_items(ctx, PromptSetSpec(name="g", source="geneval", path=str(meta), scorers=[{"kind": "shapes"}]), "w")
    assert [r.text for r in requests] == [i.prompt for i in items] and {r.negative_prompt for r in requests} == {None}
    assert [(i.prompt, i.metadata["tag"]) for i in items] == [("a photo of a dog", "single_object"), ("two cats", "counting")]
    csv = tmp_path / "dpg_bench.csv"
    csv.write_text("item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language\n"
                   "bus1,a red bus,bus,1,0,entity,whole,entity - whole (bus),Is there a bus?\n"
                   "bus1,a red bus,bus,2,1,attribute,color,attribute - color (bus red),Is the bus red?\n"
                   "bird2,two birds,bird,1,0,entity,whole,entity - whole (bird),Are there birds?\n")
    items, _ = load_items(ctx, PromptSetSpec(name="d", source="dpg", path=str(csv), scorers=[{"kind": "shapes"}]), "w")
    assert [(i.prompt, i.id, len(i.metadata["questions"])) for i in items] == [("a red bus", "bus1", 2), ("two birds", "bird2", 1)]
    meta.write_text('{"prompt": "no tag"}\n')
    with pytest.raises(ConfigError, match="line 1 lacks GenEval's"):
        load_items(ctx, PromptSetSpec(name="g", source="geneval", path=str(meta), scorers=[{"kind": "shapes"}]), "w")
    with pytest.raises(ConfigError, match="holds no combinations out"):
        ctx.dataset_files["demo_shapes"] = demo_dataset(tmp_path, held_out=0)
        load_items(ctx, PromptSetSpec(**SETS[0]), "w")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_eval_draws_scores_resumes_and_takes_back_unchanged_checkpoints(backend, tmp_path, monkeypatch, ray_session, s3_server):
    """On the session cluster: the checkpoints draw in tasks and the scorers run in actor pools, each with the
    stage's resources (its GPUs in production: the stage's own task holds none). The same on a bucket: every image,
    score and report through the store, the checkpoints fetched from it, taken-back images not read again."""
    import hashlib

    import simplear.evaluation.stage as stage
    from simplear.evaluation.stage import run_eval_stage
    from simplear.storage import open_store
    from simplear.workflow.manifest import MANIFEST, describe_outputs
    from simplear.workflow.previous import move_aside

    run = str(tmp_path / "run") if backend == "local" else s3_server.bucket("eval") + "/run"
    store = open_store(run)
    save_stage_checkpoint(store, "pretrain", 1, tmp_path)
    save_stage_checkpoint(store, "sft", 2, tmp_path)
    config = {"prompt_sets": [{**SETS[0], "scorers": [{"kind": "shapes"}, {"kind": "clip_score", "reward": {"model": TINY_CLIP_NAME, "pretrained": None}}]}],
              "samples_per_prompt": 2, "batch_size": 4, "sampling": {"cfg_scale": 2.0}, "grid_prompts": 3}
    # 2 pools of 2 actors of 0.75 CPU on the session's 2 CPUs: the second pool waits for the first one's CPUs
    ctx = make_ctx(tmp_path, config, resources=Resources(cpus=0.75, concurrency=2), run=None if backend == "local" else run)
    assert ctx.store.uri == store.uri
    read = lambda rel: store.read(f"eval/{rel}").data  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(run_eval_stage, ctx).result(timeout=300)  # slower with fewer CPUs, never stuck
    workers = result.metrics["workers"]
    # a task per checkpoint and a pool per scorer of `concurrency` actors (two checkpoints x 12 images: 2 calls)
    assert sorted(workers) == ["draw:pretrain", "draw:sft"] + [f"score:held_out/{k}:{i}" for k in ("clip_score", "shapes")
                                                               for i in (0, 1)]
    assert all(w["resources"] == {"CPU": 0.75} and w["gpu_ids"] == [] for w in workers.values())
    assert workers["draw:sft"]["device"] == "cpu"
    for ck in ("pretrain", "sft"):  # GenEval's layout: 6 held-out prompts x 2 samples
        listed = {i.key[len(f"eval/images/{ck}/held_out/"):] for i in store.list(f"eval/images/{ck}/held_out")}
        assert {k for k in listed if "/samples/" in k} == {f"{i:05d}/samples/{j:04d}.png" for i in range(6) for j in range(2)}
        assert {f"{i:05d}/metadata.jsonl" for i in range(6)} | {"key.json", "scores/shapes/shapes.jsonl"} <= listed
        assert json.loads(read(f"images/{ck}/held_out/00000/metadata.jsonl"))["prompt"].endswith("background")
        # the draw tasks hand back every image's manifest entry, computed from the bytes they wrote
        png = f"images/{ck}/held_out/00003/samples/0001.png"
        assert result.files[png] == {"path": png, "bytes": len(read(png)), "sha256": hashlib.sha256(read(png)).hexdigest()}
    # the same seeds for both checkpoints, different weights: different images
    a, b = (read(f"images/{ck}/held_out/00000/samples/0000.png") for ck in ("pretrain", "sft"))
    assert a != b
    report = json.loads(read("report.json"))
    assert [c["name"] for c in report["checkpoints"]] == ["pretrain", "sft"]
    assert report["checkpoints"][1]["path"] == store.child("sft/final")
    assert set(report["sets"]["held_out"]["scores"]) == {"shapes", "clip_score"}
    assert len(report["sets"]["held_out"]["grids"]) == 3 and "report.html" in result.artifacts
    assert b"<table" in read("report.html")
    assert result.metrics["drawn_prompts"] == {"pretrain/held_out": 6, "sft/held_out": 6}

    # a killed run: two prompts of sft lost their done marker; the rerun draws only those, the same images
    for i in (1, 4):
        store.delete(f"eval/images/sft/held_out/{i:05d}/metadata.jsonl")
    again = run_eval_stage(ctx)
    assert again.metrics["drawn_prompts"] == {"sft/held_out": 2}
    assert read("images/sft/held_out/00000/samples/0000.png") == b
    # the manifest as the engine writes it
    store.write_json(f"eval/{MANIFEST}", {"outputs": describe_outputs(store, "eval", known={**result.files, **again.files})})

    # SFT trained again (new fingerprint): the engine moves the outputs aside; pretrain's images come back, sft's are drawn
    move_aside(store, "eval", "old", "inputs changed")
    save_stage_checkpoint(store, "sft", 3, tmp_path)
    third = run_eval_stage(ctx)
    assert third.metrics["drawn_prompts"] == {"sft/held_out": 6}
    report_after_third = read("report.json")
    assert read("images/pretrain/held_out/00000/samples/0000.png") == a
    assert read("images/sft/held_out/00000/samples/0000.png") != b  # new weights under the same key: fetched again
    assert not any(store.list("eval/.previous/old/images/pretrain"))  # moved back, not copied
    assert any(store.list("eval/.previous/old/images/sft"))  # another checkpoint's images stay aside
    # the taken-back images' entries come from the earlier manifest (not read again); the new ones from the draw
    kept = "images/pretrain/held_out/00000/samples/0000.png"
    assert third.files[kept]["sha256"] == hashlib.sha256(a).hexdigest()
    assert {p for p in third.files if p.startswith("images/sft/") and p.endswith(".png")} == {
        f"images/sft/held_out/{i:05d}/samples/{j:04d}.png" for i in range(6) for j in range(2)}

    # nothing changed since: no image drawn, no scorer (nor its models) built, the same report
    started = []
    monkeypatch.setattr(stage, "draw_all", lambda *a: started.append("draw") or {})
    monkeypatch.setattr(stage, "score_all", lambda *a: started.append("score") or {})
    assert run_eval_stage(ctx).metrics["drawn_prompts"] == {} and started == []
    assert json.loads(read("report.json"))["sets"] == json.loads(report_after_third)["sets"]


def test_checkpoint_rules(tmp_path):
    from pydantic import ValidationError

    from simplear.evaluation.config import EvalStageConfig
    from simplear.evaluation.stage import resolve_checkpoints

    with pytest.raises(ValidationError, match="either `stage`"):
        EvalStageConfig.model_validate({"prompt_sets": SETS, "checkpoints": [{"stage": "a", "path": "b"}]})
    with pytest.raises(ValidationError, match="a folder needs `size`"):
        EvalStageConfig.model_validate({"prompt_sets": SETS, "checkpoints": [{"path": "b"}]})
    with pytest.raises(ValidationError, match="one scorer of each kind"):
        EvalStageConfig.model_validate({"prompt_sets": [{**SETS[0], "scorers": [{"kind": "shapes"}, {"kind": "shapes"}]}]})
    with pytest.raises(ValidationError, match="2x2 grid"):
        EvalStageConfig.model_validate({"prompt_sets": [{"name": "d", "source": "dpg", "path": "p", "scorers": [{"kind": "shapes"}]}],
                                        "samples_per_prompt": 2})
    from simplear.storage import open_store

    save_stage_checkpoint(open_store(tmp_path / "run"), "pretrain", 1, tmp_path)
    ctx = make_ctx(tmp_path, {"prompt_sets": SETS, "checkpoints": [{"stage": "grpo"}]}, needs=["pretrain"])
    with pytest.raises(ConfigError, match=r"checkpoints\[0\]\.stage: 'grpo' is not among the stage's needs"):
        resolve_checkpoints(ctx, ctx.config, "w")
    ctx = make_ctx(tmp_path, {"prompt_sets": SETS, "checkpoints": [{"stage": "pretrain", "size": 36}]}, needs=["pretrain"])
    with pytest.raises(ConfigError, match="36x36 is not a multiple of the tokenizer's 8 px"):
        resolve_checkpoints(ctx, ctx.config, "w")
    ctx = make_ctx(tmp_path, {"prompt_sets": SETS, "checkpoints": [{"stage": "pretrain", "size": 48, "name": "p48"}]},
                   needs=["pretrain"])
    assert [(c.name, c.grid) for c in resolve_checkpoints(ctx, ctx.config, "w")] == [("p48", (6, 6))]
