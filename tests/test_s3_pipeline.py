"""The demo's data stages, pretrain -> SFT -> GRPO and serve with the run dir on S3 (a real S3 server on loopback):
download, filter, recaption and tokenize write their parts and receipts on the bucket; Ray Train persists its
checkpoints there through the run dir's filesystem; the training workers read the tokenized Parquet from it; SFT
and GRPO start from the stage before's final/ fetched from it, and serve deploys GRPO's; logs, figures and GRPO's
held-out evaluation are published there. Nothing of the run lands on a local disk but the nodes' staging dirs,
which hold no checkpoint afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines_support import DATA_STAGES, data_workflow
from simplear.storage import open_store
from simplear.train import FINAL, METRICS
from simplear.workflow.engine import plan, run_workflow, select
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow

STEPS = 4
GRPO_STEPS = 2
APP = "s3-run"
TRAIN = {"steps": STEPS, "global_batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "num_threads": 1}


def test_data_stages_then_training_and_serving_on_s3(ray_session, s3_server, serve_torch_app, tmp_path):
    """The serve stage deploys beside the session's Serve app, on its HTTP port: Serve has one proxy per cluster,
    and a stage that started it on another port would leave the other Serve tests knocking on a closed one."""
    from ray import serve

    path = data_workflow(tmp_path, count=60, keep=(*DATA_STAGES, "pretrain", "sft", "grpo", "serve"), stages={
        "download": {"config": {"number_sample_per_shard": 30}},
        "pretrain": {"config": {"train": TRAIN, "samples": {"per_prompt": 1}}},
        "sft": {"config": {"train": TRAIN, "samples": None}},
        "grpo": {"config": {"train": {**TRAIN, "steps": GRPO_STEPS, "checkpoint_every": GRPO_STEPS},
                            "grpo": {"num_generations": 4}, "prompts": {"eval_count": 2},
                            "eval": {"samples_per_prompt": 1, "cfg_scales": []}, "samples": {"per_prompt": 1}}},
        "serve": {"config": {"engine": "torch", "app_name": APP, "route_prefix": f"/{APP}", "sizes": ["96x96"],
                             "port": serve_torch_app.port}},
    })
    run_dir = s3_server.bucket("pipeline") + "/runs/demo"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "run_dir": run_dir}, sort_keys=False))
    wf = load_workflow(path)
    try:
        run_workflow(wf, select(wf))
    finally:
        if APP in serve.status().applications:
            serve.delete(APP)
    store = open_store(run_dir)
    manifests = {name: store.read_json(f"{name}/{MANIFEST}") for name in wf.stages}
    assert manifests["download"]["rows"] == manifests["filter"]["metrics"]["rows_in"] > 60  # the demo's broken rows too
    kept = manifests["filter"]["metrics"]["rows_out"]["shards"]
    assert manifests["recaption"]["metrics"]["rows_in"] == kept and manifests["tokenize"]["metrics"]["rows_in"] > 0
    for name in ("filter", "recaption", "tokenize"):  # every part the manifest lists is on the bucket, as recorded
        parts = [o for o in manifests[name]["outputs"] if o["path"].endswith(".parquet")]
        sizes = {i.key: i.size for i in store.list(name)}
        assert parts and all(sizes[f"{name}/{o['path']}"] == o["bytes"] for o in parts), name
    for stage in ("pretrain", "sft"):
        m = manifests[stage]
        assert m["metrics"]["steps"] == STEPS, stage
        assert {f"{FINAL}/model.safetensors", f"{FINAL}/config.json", METRICS, "loss_curve.png"} <= {o["path"] for o in m["outputs"]}
        logged = [json.loads(line)["step"] for line in store.read(f"{stage}/{METRICS}").data.decode().splitlines()]
        assert logged == list(range(1, STEPS + 1)), stage
        checkpoints = sorted({i.key.split("/")[2] for i in store.list(f"{stage}/{stage}") if "/checkpoint-" in i.key})
        assert checkpoints == ["checkpoint-00000002", "checkpoint-00000004"], stage  # persisted by Ray Train on the bucket
        assert [i for i in store.list(f"{stage}/tensorboard")], stage
    assert store.exists("pretrain/samples.png")
    grpo = manifests["grpo"]
    assert grpo["metrics"]["steps"] == GRPO_STEPS and grpo["metrics"]["eval_prompts"] == 2
    assert {f"{FINAL}/model.safetensors", METRICS, "eval.json", "reward_curve.png", "samples.png",
            "samples_before.png"} <= {o["path"] for o in grpo["outputs"]}
    logged = [json.loads(line)["step"] for line in store.read(f"grpo/{METRICS}").data.decode().splitlines()]
    assert logged == list(range(1, GRPO_STEPS + 1))  # trl's log rows, published by rank 0 with its checkpoint
    assert json.loads(store.read("grpo/final/trainer_state.json").data)["stage"] == "grpo"
    assert store.read_json("grpo/eval.json")["comparison"]["total"]  # the held-out evaluation, on the bucket
    endpoint = store.read_json("serve/endpoint.json")
    assert endpoint["checkpoint"] == f"{run_dir}/grpo/final"  # served from the bucket, fetched by the replica
    assert store.read("serve/sample.png").data.startswith(b"\x89PNG")
    assert json.loads(store.read("sft/final/trainer_state.json").data)["stage"] == "sft"
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("s3:*"))
    staging = list(Path(ray_session.temp_dir).rglob("simplear-staging"))  # in Ray's temp dir, not the system's
    assert [w for s in staging for w in s.glob("work-*")], staging  # the workers' logs were written there
    staged = [p for s in staging for p in (*s.rglob("ckpt-*"), *s.rglob("grpo-hf-*"))]
    assert not staged  # each checkpoint staged there (trl's too), then deleted
    assert [action for _, _, action in plan(wf, select(wf))] == ["skip"] * len(wf.stages)
