"""Pretrain -> SFT with the run dir on S3 (a real S3 server on loopback): Ray Train persists its checkpoints on the
bucket through the run dir's filesystem, the workers read the tokenized Parquet from it, SFT starts from pretrain's
final/ fetched from it, and the logs and figures are published there. Nothing of the run lands on a local disk
but the node's staging dir, which holds no checkpoint after the run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from simplear.storage import open_store
from simplear.train import FINAL, METRICS
from simplear.workflow.engine import run_workflow, select
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow
from simplear.workflow.status import workflow_status

STEPS = 4


def test_pretrain_then_sft_on_s3(ray_session, s3_server, tmp_path):
    run_dir = s3_server.bucket("training") + "/runs/t"
    train = {"steps": STEPS, "global_batch_size": 8, "lr": 1.0e-3, "warmup_steps": 1, "checkpoint_every": 2, "num_threads": 1}
    body = {"run_dir": run_dir, "plugins": ["test_training_helpers"], "stages": {
        "shapes": {"uses": "test_shapes_tokens", "config": {"counts": {32: 64}}},
        "pretrain": {"uses": "pretrain", "needs": ["shapes"], "resources": {"cpus": 1},
                     "config": {"data": {"stage": "shapes", "resolution": 32}, "train": train, "samples": {"per_prompt": 1}}},
        "sft": {"uses": "sft", "needs": ["pretrain", "shapes"], "resources": {"cpus": 1},
                "config": {"init": "pretrain", "data": {"stage": "shapes", "resolution": 32}, "train": train,
                           "samples": None}},
    }}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(body))
    wf = load_workflow(path)
    run_workflow(wf, select(wf))
    store = open_store(run_dir)
    for stage in ("pretrain", "sft"):
        manifest = store.read_json(f"{stage}/{MANIFEST}")
        assert manifest["metrics"]["steps"] == STEPS, stage
        outputs = {o["path"] for o in manifest["outputs"]}
        assert {f"{FINAL}/model.safetensors", f"{FINAL}/config.json", METRICS, "loss_curve.png"} <= outputs, stage
        logged = [json.loads(line)["step"] for line in store.read(f"{stage}/{METRICS}").data.decode().splitlines()]
        assert logged == list(range(1, STEPS + 1)), stage
        checkpoints = sorted({i.key.split("/")[2] for i in store.list(f"{stage}/{stage}") if "/checkpoint-" in i.key})
        assert checkpoints == ["checkpoint-00000002", "checkpoint-00000004"], stage  # persisted by Ray Train on the bucket
        assert any(i.key.startswith(f"{stage}/tensorboard/") for i in store.list(f"{stage}/tensorboard"))
    assert store.exists("pretrain/samples.png")
    assert json.loads(store.read("sft/final/trainer_state.json").data)["stage"] == "sft"
    assert not (tmp_path / "runs").exists()
    staging = list(Path(ray_session.temp_dir).rglob("simplear-staging"))  # in Ray's temp dir, not the system's
    assert [w for s in staging for w in s.glob("work-*")], staging  # the workers' logs were written there
    assert not [p for s in staging for p in s.rglob("ckpt-*")]  # each checkpoint staged there, then deleted
    assert {n: s.state for n, s in workflow_status(wf).items()} == dict.fromkeys(("shapes", "pretrain", "sft"), "done")
