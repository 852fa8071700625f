"""The engine on a real Ray cluster: fingerprints, skip, stale propagation, --from/--only/--force, failures, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from simplear.config import ConfigError
from simplear.workflow.engine import RunFailed, plan, run_workflow, select, workflow_status
from simplear.workflow.manifest import FAILED, MANIFEST
from simplear.workflow.spec import load_workflow

ROOT = Path(__file__).resolve().parent.parent


def make_workflow(tmp_path, **config_by_stage) -> Path:
    """a -> (b, c) -> d, all of the tests' `test_shards` kind."""
    stages = {
        "a": {"uses": "test_shards", "config": {"shards": 2}},
        "b": {"uses": "test_shards", "needs": ["a"]},
        "c": {"uses": "test_shards", "needs": ["a"]},
        "d": {"uses": "test_shards", "needs": ["b", "c"]},
    }
    for name, cfg in config_by_stage.items():
        stages[name]["config"] = {**stages[name].get("config", {}), **cfg}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "runs", "plugins": ["stage_kinds"], "stages": stages}))
    return path


def run(path, **selection):
    wf = load_workflow(path)
    return run_workflow(wf, select(wf, **selection))


def states(path) -> dict[str, str]:
    return {n: s.state for n, s in workflow_status(load_workflow(path)).items()}


def started_at(path) -> dict[str, float]:
    runs = path.parent / "runs"
    return {n: json.loads((runs / n / MANIFEST).read_text())["started_at"] for n in "abcd"}


def values(stage_dir: Path) -> list[int]:
    return sorted(v for f in sorted(stage_dir.glob("*.parquet")) for v in pq.read_table(f)["x"].to_pylist())


def test_run_then_skip_everything(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    assert states(path) == dict.fromkeys("abcd", "pending")
    run(path)
    assert states(path) == dict.fromkeys("abcd", "done")
    manifest = json.loads((tmp_path / "runs/b" / MANIFEST).read_text())
    assert manifest["rows"] == 12 and len(manifest["outputs"]) == 3
    assert all(len(o["sha256"]) == 64 and o["rows"] == 4 for o in manifest["outputs"])
    assert manifest["config"]["shards"] == 3 and manifest["metrics"] == {"shards_written": 3}
    before = started_at(path)
    run(path)
    assert started_at(path) == before


def test_config_change_makes_the_stage_and_downstream_stale(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    before = started_at(path)
    path = make_workflow(tmp_path, b={"value": 7})
    assert states(path) == {"a": "done", "b": "stale", "c": "done", "d": "stale"}
    assert [(n, a) for n, _, a in plan(load_workflow(path), select(load_workflow(path)))] == [
        ("a", "skip"), ("b", "run"), ("c", "skip"), ("d", "run")
    ]
    run(path)
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["b", "d"]
    assert values(tmp_path / "runs/b")[0] == 7000 + sum(range(8))
    assert states(path) == dict.fromkeys("abcd", "done")


def test_force_reruns_only_that_stage_when_its_outputs_do_not_change(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    before = started_at(path)
    run(path, force=["a"])
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["a"]


def test_from_reruns_the_stage_and_everything_downstream(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    before = started_at(path)
    run(path, from_="b")
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["b", "d"]


def test_only_runs_one_stage_and_needs_its_inputs_done(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    with pytest.raises(ConfigError, match="'b' needs 'a', which is pending"):
        run(path, only="b")
    run(path, only="a")
    assert states(path) == {"a": "done", "b": "pending", "c": "pending", "d": "pending"}
    run(path, only="c")
    assert states(path) == {"a": "done", "b": "pending", "c": "done", "d": "pending"}


def test_unknown_stage_in_a_flag(tmp_path):
    wf = load_workflow(make_workflow(tmp_path))
    with pytest.raises(ConfigError, match="--from zz: no such stage"):
        select(wf, from_="zz")


def test_dry_run_plans_without_touching_anything(tmp_path):
    path = make_workflow(tmp_path)
    wf = load_workflow(path)
    assert plan(wf, select(wf, force=["c"])) == [("a", "pending", "run"), ("b", "pending", "run"), ("c", "pending", "rerun"), ("d", "pending", "run")]
    assert not (tmp_path / "runs").exists()


def test_a_failed_stage_is_recorded_and_stops_its_downstream(ray_session, tmp_path):
    path = make_workflow(tmp_path, c={"fail": True})
    with pytest.raises(RunFailed, match="c"):
        run(path)
    st = states(path)
    assert st == {"a": "done", "b": "done", "c": "failed", "d": "pending"}  # b does not depend on c
    failure = json.loads((tmp_path / "runs/c" / FAILED).read_text())
    assert "asked to fail" in failure["error"]
    path = make_workflow(tmp_path, c={"fail": False})
    run(path)
    assert states(path) == dict.fromkeys("abcd", "done")
    assert not (tmp_path / "runs/c" / FAILED).exists()


def _simplear(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "simplear.cli", *args], env=env, cwd=ROOT, **kw)


def test_driver_killed_mid_stage_then_resumed_matches_an_uninterrupted_run(ray_session, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session.address, "RAY_AUTH_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    for sub in ("killed", "clean"):
        (tmp_path / sub).mkdir()
    killed = make_workflow(tmp_path / "killed", a={"shards": 6, "seconds_per_shard": 1.0})
    clean = make_workflow(tmp_path / "clean", a={"shards": 6, "seconds_per_shard": 0.0})

    proc = _simplear(["run", str(killed)], env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_a = killed.parent / "runs/a"
    deadline = time.time() + 120
    while len(list(stage_a.glob("*.parquet"))) < 2:
        assert time.time() < deadline and proc.poll() is None, "stage a never wrote its first shards"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage_a / MANIFEST).exists()
    # Ray ends the dead driver's stage task; wait for its worker to go before resuming.
    first_pid = json.loads((stage_a / "_log.jsonl").read_text().splitlines()[0])["pid"]
    psutil.wait_procs([psutil.Process(first_pid)] if psutil.pid_exists(first_pid) else [], timeout=60)
    n_before = len(list(stage_a.glob("*.parquet")))
    assert 2 <= n_before < 6

    assert _simplear(["run", str(killed)], env).wait(timeout=300) == 0
    assert _simplear(["run", str(clean)], env).wait(timeout=300) == 0

    log = [json.loads(line) for line in (stage_a / "_log.jsonl").read_text().splitlines()]
    assert sorted(e["shard"] for e in log) == list(range(6)), "a shard was written twice or never"
    assert len({e["pid"] for e in log}) == 2
    for stage in "abcd":
        assert values(killed.parent / "runs" / stage) == values(clean.parent / "runs" / stage)
        assert json.loads((killed.parent / "runs" / stage / MANIFEST).read_text())["outputs"] == json.loads(
            (clean.parent / "runs" / stage / MANIFEST).read_text()
        )["outputs"]


def test_code_version_follows_the_stage_module_and_its_helpers_but_not_the_engine(tmp_path, monkeypatch):
    pkg = tmp_path / "myplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("FACTOR = 1\n")
    (pkg / "kind.py").write_text(
        "from simplear.config import StrictModel\n"
        "from simplear.workflow import register_stage\n"
        "from myplug.helper import FACTOR\n"
        "class Cfg(StrictModel):\n    pass\n"
        "@register_stage('myplug_kind', Cfg)\ndef run(ctx):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from simplear.workflow.registry import get_stage_kind, import_plugins

    import_plugins(["myplug.kind"])
    kind = get_stage_kind("myplug_kind")
    v1 = kind.code_version
    assert kind.code_version == v1
    (pkg / "helper.py").write_text("FACTOR = 2\n")
    v2 = kind.code_version
    assert v2 != v1
    (pkg / "kind.py").write_text((pkg / "kind.py").read_text() + "# edited\n")
    assert kind.code_version not in (v1, v2)
