"""Run dirs on object storage: the engine, the lock, status, --dry-run and clean against a real S3 server on
loopback (tests/s3_server.py), with the tests' `test_shards` kind (it writes only through the storage-neutral
context). A driver SIGKILLed mid-stage is taken over and ends with the outputs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from simplear.cli import main
from simplear.config import ConfigError
from simplear.storage import open_store
from simplear.workflow.engine import plan, run_workflow, select
from simplear.workflow.lock import LOCK, LockSettings, RunLock
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow
from simplear.workflow.status import format_status, workflow_status
from stage_kinds import shard_log
from test_engine import ROOT, make_workflow


def on_s3(path, run_dir: str):
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "run_dir": run_dir}))
    return path


def values(store, stage: str) -> list[int]:
    fs, root = store.filesystem()
    manifest = store.read_json(f"{stage}/{MANIFEST}")
    return sorted(v for o in manifest["outputs"] for v in pq.read_table(f"{root}/{stage}/{o['path']}", filesystem=fs)["x"].to_pylist())


def test_a_workflow_on_s3_runs_skips_reruns_and_cleans(ray_session, s3_server, tmp_path, capsys):
    run_dir = s3_server.bucket("engine") + "/runs/demo"
    path = on_s3(make_workflow(tmp_path), run_dir)
    wf = load_workflow(path)
    assert wf.run_uri == run_dir and not wf.store.is_local
    run_workflow(wf, select(wf))
    store = open_store(run_dir)
    assert {n: s.state for n, s in workflow_status(wf).items()} == dict.fromkeys("abcd", "done")
    # a: 0..7; b and c each add a's sum (28) to their own 0..11 (sum 402 each); d adds b's and c's sums
    assert values(store, "a") == list(range(8)) and values(store, "d") == [804 + k for k in range(12)]
    assert not store.exists(LOCK) and not (tmp_path / "runs").exists() and not list(tmp_path.glob("s3:*"))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()] == ["skip"] * 4
    assert "state" in format_status(wf, workflow_status(wf))

    # a second run beside a live one is refused, naming it
    holder = RunLock.acquire(store, LockSettings(heartbeat_s=60))
    try:
        assert main(["run", str(path)]) == 3
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.release()

    # --force moves the old outputs aside on the bucket; clean removes them and says how much it freed
    run_workflow(wf, select(wf, only="a", force=["a"]))
    moved = [i.key for i in store.list("a/.previous")]
    assert any(k.endswith("part-00000.parquet") for k in moved) and any(k.endswith("_MOVED.json") for k in moved)
    assert len(shard_log(store, "a")) == 2  # the forced run wrote both shards again (the old log moved aside)
    assert main(["clean", str(path)]) == 0
    assert "a: removed 1 set(s) of previous outputs" in capsys.readouterr().out
    assert not list(store.list("a/.previous")) and store.exists(f"a/{MANIFEST}")


def test_a_kind_that_writes_folders_is_refused_on_object_storage_before_any_work(s3_server, tmp_path):
    run_dir = s3_server.bucket("folders") + "/r"
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"run_dir": run_dir, "plugins": ["stage_kinds"], "stages": {
        "a": {"uses": "test_shards"}, "b": {"uses": "test_folder_only", "needs": ["a"]}}}))
    wf = load_workflow(path)
    for attempt in (lambda: plan(wf, select(wf)), lambda: run_workflow(wf, select(wf))):
        with pytest.raises(ConfigError, match=r"stages b \(kinds test_folder_only\) write their run dir as a folder"):
            attempt()
    assert not list(open_store(run_dir).list(""))


def test_a_driver_killed_mid_stage_on_s3_is_taken_over_and_matches_an_uninterrupted_run(ray_session, s3_server, tmp_path,
                                                                                         caplog):
    """`simplear run` on an embedded Ray, SIGKILLed mid-stage; the next run (here, in this process on the session's
    cluster) takes the dead run's lock over and ends with the outputs of an uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    bucket = s3_server.bucket("killed")
    embedded = {"num_cpus": 2, "include_dashboard": False}
    for sub in ("killed", "clean"):
        (tmp_path / sub).mkdir()
    killed = on_s3(make_workflow(tmp_path / "killed", ray=embedded, a={"shards": 6, "seconds_per_shard": 1.0}), f"{bucket}/killed")
    clean = on_s3(make_workflow(tmp_path / "clean", a={"shards": 6}), f"{bucket}/clean")
    store = open_store(f"{bucket}/killed")
    proc = subprocess.Popen([sys.executable, "-m", "simplear", "run", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len([i for i in store.list("a") if i.key.endswith(".parquet")]) < 2:
        assert time.time() < deadline and proc.poll() is None, "stage a never wrote its first shards"
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.exists(LOCK) and not store.exists(f"a/{MANIFEST}")
    status = json.loads(subprocess.run([sys.executable, "-m", "simplear", "status", str(killed), "--json"], env=env,
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert status["run_dir"] == f"{bucket}/killed" and status["stages"]["a"]["state"] == "partial"
    assert status["stages"]["a"]["progress"].endswith("shards written")  # read from the bucket
    wf = load_workflow(killed)
    run_workflow(wf, select(wf))
    assert "taking over the lock" in caplog.text and "is gone" in caplog.text
    wf = load_workflow(clean)
    run_workflow(wf, select(wf))
    log = shard_log(store, "a")
    assert sorted(e["shard"] for e in log) == list(range(6)) and len({e["pid"] for e in log}) == 2
    other = open_store(f"{bucket}/clean")
    for stage in "abcd":
        assert values(store, stage) == values(other, stage)
        assert store.read_json(f"{stage}/{MANIFEST}")["outputs"] == other.read_json(f"{stage}/{MANIFEST}")["outputs"]
    assert not store.exists(LOCK)
