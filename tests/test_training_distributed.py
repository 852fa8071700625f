"""Two Ray Train workers (DDP over gloo on CPU): a killed run resumes to the same weights, batches and step."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from simplear.train_data import DataFile
from simplear.training import TRAINER_STATE, _resume_position, checkpoints_dir, fit
from simplear.workflow.spec import Resources
from test_training import CrashingTask, task, train_cfg, weights
from test_training_helpers import shapes_table


def test_a_killed_two_worker_run_resumes_exactly(ray_session, tmp_path):
    files = []
    for i in range(4):  # the rows of each source in its own files, as the tokenize stage writes them
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(shapes_table(24, 32, seed=20 + i), path)
        files.append(DataFile(str(path), 24))
    cfg = train_cfg(steps=6, global_batch_size=8, checkpoint_every=2, keep_checkpoints=None, shuffle_buffer=8, max_failures=0,
                    report_interval_s=0)
    t = task()
    two = Resources(cpus=1, concurrency=2)

    fit(t, cfg, stage_dir=tmp_path / "straight", resources=two, files=files, columns=t.columns)
    with pytest.raises(Exception, match="killed"):  # both workers die in step 5 (one micro-batch per step each)
        fit(CrashingTask(4, **t.__dict__), cfg, stage_dir=tmp_path / "killed", resources=two, files=files, columns=t.columns)
    fit(t, cfg, stage_dir=tmp_path / "killed", resources=two, files=files, columns=t.columns)

    end_a = sorted(checkpoints_dir(tmp_path / "straight").glob("checkpoint-*"))[-1]
    end_b = sorted(checkpoints_dir(tmp_path / "killed").glob("checkpoint-*"))[-1]
    assert end_a.name == end_b.name == "checkpoint-00000006"
    state_a, state_b = (json.loads((d / TRAINER_STATE).read_text()) for d in (end_a, end_b))
    assert state_b["resumed_at"] == [4] and state_a["world_size"] == state_b["world_size"] == 2
    assert state_a["positions"] == state_b["positions"] and len(state_b["positions"]) == 2
    assert state_b["positions"][0] != state_b["positions"][1]  # each worker its own files
    wa, wb = weights(end_a), weights(end_b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_resume_with_another_worker_count_refuses():
    state = {"step": 4, "positions": [{"epoch": 0, "batch": 4}, {"epoch": 0, "batch": 4}]}
    assert _resume_position(state, 1, 2).batch == 4
    with pytest.raises(RuntimeError, match="written by 2 workers, this run has 1"):
        _resume_position(state, 0, 1)
    with pytest.raises(RuntimeError, match="predates per-worker data positions"):
        _resume_position({"step": 4, "position": {"epoch": 0, "batch": 4}}, 0, 1)
