"""Two Ray Train workers (DDP over gloo on CPU): a killed run resumes to the same weights, batches and step;
DDP and FSDP2 give the losses of one worker; a two-node cluster places a worker on each node."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from simplear.train_data import DataFile
from simplear.train import TRAINER_STATE, checkpoints_dir, fit
from simplear.train.loop import _resume_position
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


class SplitRows:
    """Stands in for a worker's files: step k's global batch is rows [k*G, (k+1)*G) of one table, and rank r
    of w takes rows r::w of it, so 1 worker and 2 see the same global batches."""

    def __init__(self, rows: dict, rank: int, world: int, per_step: int):
        self.rows, self.rank, self.world, self.per_step, self.step = rows, rank, world, per_step, 0

    def batches(self, start, batch_size):
        import numpy as np

        from simplear.train_data import Position

        n = len(next(iter(self.rows.values())))
        self.step = start.batch
        while True:
            idx = np.arange(self.step * self.per_step, (self.step + 1) * self.per_step) % n
            self.step += 1
            yield Position(0, self.step), {c: v[idx[self.rank::self.world]] for c, v in self.rows.items()}

    def position(self):
        from simplear.train_data import Position

        return Position(0, self.step)


def split_rows_worker(config: dict) -> None:
    """fit()'s worker with the loop's data replaced by `SplitRows`."""
    import pyarrow.parquet as pq

    from simplear.train import RaySession, TrainConfig, train_loop

    cfg = TrainConfig.model_validate(config["train"])
    session = RaySession([], config["columns"])
    table = pq.read_table(config["files"][0]["path"], columns=config["columns"])
    rows = {c: table[c].to_numpy(zero_copy_only=False) for c in config["columns"]}
    session.worker_rows = lambda seed, buffer: SplitRows(rows, session.rank, session.world_size, cfg.global_batch_size)
    train_loop(config["task"], cfg, session, config["out_dir"], config.get("run_info"))


def test_two_workers_with_ddp_or_fsdp2_give_the_losses_of_one(ray_session, tmp_path):
    from simplear.t2i import SequenceSpec
    from simplear.train import read_metrics

    data = tmp_path / "data.parquet"
    pq.write_table(shapes_table(32, 32, seed=5), data)
    t = task(sequence=SequenceSpec(cfg_dropout=0.0))  # dropout draws depend on the rank
    files = [DataFile(str(data), 32)]
    losses = {}
    for name, strategy, workers in (("one", "ddp", 1), ("ddp", "ddp", 2), ("fsdp", "fsdp", 2)):
        cfg = train_cfg(steps=3, global_batch_size=8, strategy=strategy, checkpoint_every=3, report_interval_s=0, max_failures=0)
        fit(t, cfg, stage_dir=tmp_path / name, resources=Resources(cpus=1, concurrency=workers), files=files, columns=t.columns,
            worker=split_rows_worker)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert len(losses["one"]) == 3
    for name in ("ddp", "fsdp"):
        assert losses[name] == pytest.approx(losses["one"], rel=1e-4), (name, losses)


def node_recording_worker(config: dict) -> None:
    """`fit`'s own worker, after noting which node this rank runs on."""
    from pathlib import Path

    import ray
    import ray.train

    from simplear.train.fit import loop_worker

    rank = ray.train.get_context().get_world_rank()
    Path(config["out_dir"], f"node-of-rank-{rank}").write_text(ray.get_runtime_context().get_node_id())
    loop_worker(config)


def test_a_two_node_cluster_runs_one_worker_on_each_node(tmp_path, monkeypatch):
    """A cluster of its own: a head and a worker node on loopback, one CPU each, so a 1-CPU worker fits once per
    node. DDP over gloo across the nodes trains to the end, and both workers' data positions are checkpointed."""
    import ray

    from conftest import ROOT, add_worker_node, start_ray_head

    if ray.is_initialized():
        ray.shutdown()  # from the session cluster; the next test's fixture attaches again
    head = start_ray_head(num_cpus=1)
    try:
        add_worker_node(head, num_cpus=1)
        monkeypatch.setenv("RAY_ADDRESS", head.address)
        ray.init(address=head.address, runtime_env={"env_vars": {
            "PYTHONPATH": str(ROOT / "tests"), "OMP_WAIT_POLICY": "PASSIVE", "RAY_ADDRESS": head.address}})
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        files = []
        for i in range(2):  # every worker reads whole files
            pq.write_table(shapes_table(16, 32, seed=7 + i), tmp_path / f"part-{i}.parquet")
            files.append(DataFile(str(tmp_path / f"part-{i}.parquet"), 16))
        t = task()
        cfg = train_cfg(steps=3, global_batch_size=8, checkpoint_every=3, report_interval_s=0, max_failures=0)
        fit(t, cfg, stage_dir=tmp_path / "run", resources=Resources(cpus=1, concurrency=2), files=files, columns=t.columns,
            worker=node_recording_worker)
    finally:
        ray.shutdown()
        head.stop()
    placed = {(tmp_path / "run" / f"node-of-rank-{r}").read_text() for r in range(2)}
    assert placed == nodes  # one worker on each node
    end = sorted(checkpoints_dir(tmp_path / "run").glob("checkpoint-*"))[-1]
    state = json.loads((end / TRAINER_STATE).read_text())
    assert end.name == "checkpoint-00000003" and state["world_size"] == 2 and len(state["positions"]) == 2
