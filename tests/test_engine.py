"""The engine on a real Ray cluster: fingerprints, skip, stale propagation, --from/--only/--force, failures, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from simplear.config import ConfigError
from simplear.workflow.engine import RunFailed, plan, run_workflow, select, workflow_status
from simplear.workflow import ray_session
from simplear.workflow.manifest import FAILED, MANIFEST
from simplear.workflow.spec import load_workflow
from simplear.storage.local import LocalStore
from stage_kinds import shard_log

ROOT = Path(__file__).resolve().parent.parent


def make_workflow(tmp_path, ray: dict | None = None, **config_by_stage) -> Path:
    """a -> (b, c) -> d, all of the tests' `test_shards` kind; `ray`: settings of an embedded Ray."""
    stages = {
        "a": {"uses": "test_shards", "config": {"shards": 2}},
        "b": {"uses": "test_shards", "needs": ["a"]},
        "c": {"uses": "test_shards", "needs": ["a"]},
        "d": {"uses": "test_shards", "needs": ["b", "c"]},
    }
    for name, cfg in config_by_stage.items():
        stages[name]["config"] = {**stages[name].get("config", {}), **cfg}
    path = tmp_path / "workflow.yaml"
    body = {"run_dir": "runs", "plugins": ["stage_kinds"], "stages": stages}
    if ray:
        body["ray"] = ray
    path.write_text(yaml.safe_dump(body))
    return path


def previous(stage_dir: Path) -> list[dict]:
    """What reruns moved aside in a stage folder: each set's _MOVED.json plus the Parquet it holds."""
    root = stage_dir / ".previous"
    sets = sorted(root.iterdir()) if root.is_dir() else []
    return [{**json.loads((s / "_MOVED.json").read_text()), "parquet": sorted(p.name for p in s.glob("*.parquet"))} for s in sets]


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
    assert workflow_status(load_workflow(path))["b"].reasons == ["config value: (default) -> 7"]
    run(path)
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["b", "d"]
    assert values(tmp_path / "runs/b")[0] == 7000 + sum(range(8))
    assert states(path) == dict.fromkeys("abcd", "done")
    # the outputs of the old config were moved aside, not deleted
    (moved,) = previous(tmp_path / "runs/b")
    assert moved["reason"] == "stale: config value: (default) -> 7" and moved["parquet"] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert previous(tmp_path / "runs/d")[0]["reason"] == "stale: input b changed"


def test_force_reruns_only_that_stage_when_its_outputs_do_not_change(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    before = started_at(path)
    run(path, force=["a"])
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["a"]
    assert [m["reason"] for m in previous(tmp_path / "runs/a")] == ["forced (--force)"]


def test_from_reruns_the_stage_and_everything_downstream(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    before = started_at(path)
    run(path, from_="b")
    after = started_at(path)
    assert [n for n in "abcd" if after[n] != before[n]] == ["b", "d"]
    assert [m["reason"] for m in previous(tmp_path / "runs/d")] == ["chosen by --only/--from"]


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
    return subprocess.Popen([sys.executable, "-m", "simplear", *args], env=env, cwd=ROOT, **kw)


def session_processes(session_dir: str) -> list[int]:
    return [p.pid for p in ray_session.session_processes(session_dir)]


def test_driver_killed_mid_stage_then_rerun_at_once_takes_over_and_matches_an_uninterrupted_run(tmp_path):
    """`simplear run` on an embedded Ray, SIGKILLed mid-stage, then run again straight away: the new run takes
    the dead run's lock, ends what its Ray left running, and ends with the outputs of an uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    for sub in ("killed", "clean"):
        (tmp_path / sub).mkdir()
    embedded = {"num_cpus": 2, "include_dashboard": False}
    killed = make_workflow(tmp_path / "killed", ray=embedded, a={"shards": 6, "seconds_per_shard": 1.0})
    clean = make_workflow(tmp_path / "clean", ray=embedded, a={"shards": 6, "seconds_per_shard": 0.0})

    proc = _simplear(["run", str(killed)], env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_a = killed.parent / "runs/a"
    lock_file = killed.parent / "runs/_LOCK.json"
    deadline = time.time() + 120
    while len(list(stage_a.glob("*.parquet"))) < 2:
        assert time.time() < deadline and proc.poll() is None, "stage a never wrote its first shards"
        time.sleep(0.2)
    session_dir = json.loads(lock_file.read_text())["ray_session"]["dir"]
    assert session_dir and session_processes(session_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage_a / MANIFEST).exists()
    status = json.loads(subprocess.run([sys.executable, "-m", "simplear", "status", str(killed), "--json"], env=env, cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout)["stages"]["a"]
    assert status["state"] == "partial" and status["progress"].endswith("shards written")

    rerun = subprocess.run([sys.executable, "-m", "simplear", "run", str(killed)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over the lock" in rerun.stderr and "its process" in rerun.stderr
    assert session_processes(session_dir) == [], "the dead run's embedded Ray left processes behind"
    assert not lock_file.exists()
    assert _simplear(["run", str(clean)], env).wait(timeout=300) == 0

    log = shard_log(LocalStore(stage_a.parent), "a")
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
