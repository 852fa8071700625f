"""The engine's rules that protect a user's work: honest staleness, migration, --only resumes, the run lock and
its fencing token, status. Stage kinds are the tests' own (`tests/stage_kinds.py`) or, for the staleness
rules, every built-in kind as the shipped workflow resolves it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from simplear.workflow.engine import RunFailed, holding_run_dir, plan, run_workflow, select
from simplear.workflow.fingerprint import SCHEME, legacy_fingerprint
from simplear.workflow.lock import LOCK, FencedOut, RunLock, RunLocked, LockSettings
from simplear.workflow.manifest import MANIFEST, atomic_path, atomic_write_json
from simplear.workflow.registry import BUILTIN_STAGE_MODULES, StageKind
from simplear.workflow.spec import load_workflow
from simplear.workflow.status import format_status, status_json, workflow_status
from test_engine import make_workflow, run, states, values
from simplear.storage.local import LocalStore
from stage_kinds import shard_log

ROOT = Path(__file__).resolve().parent.parent


# -- staleness: every built-in kind ------------------------------------------------------------------


def _fake_done_run(wf) -> None:
    """A manifest for every stage as if it had run, with the fingerprints the engine computes now."""
    statuses = {}
    from simplear.workflow.status import stage_status

    for name, stage in wf.stages.items():
        st = stage_status(wf, name, statuses, (None, False))
        d = wf.stage_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "out.bin").write_bytes(name.encode())
        atomic_write_json(d / MANIFEST, {
            "stage": name, "scheme": SCHEME, "fingerprint": st.fingerprint, "fingerprint_parts": st.parts,
            "code_version": stage.kind.code_version, "config": stage.config.model_dump(mode="json"),
            "outputs": [{"path": "out.bin", "bytes": len(name), "sha256": name * 4}], "rows": 0,
        })
        statuses[name] = stage_status(wf, name, statuses, (None, False))
        assert statuses[name].state == "done", (name, statuses[name].reasons)


def _other_value(model_cls, config: dict, dotted: str, context: dict):
    """A different value for one key that the config model still accepts."""
    import typing

    node, model = config, model_cls
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
        model = next(a for a in (typing.get_args(model.model_fields[p].annotation) or [model.model_fields[p].annotation])
                     if hasattr(a, "model_fields"))
    old = node[last]
    candidates = [not old] if isinstance(old, bool) else []
    candidates += [a for a in typing.get_args(model.model_fields[last].annotation) if isinstance(a, str) and a != old]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        candidates += [old * 2, old + 1, max(old // 2, 1)]
    if old is None:
        candidates += [1, 2, 0.5, True]
    for value in candidates:
        node[last] = value
        try:
            model_cls.model_validate(config, context=context)
            return value
        except Exception:  # noqa: BLE001 - try the next candidate
            continue
    raise AssertionError(f"no other valid value for {dotted} (was {old!r})")


@pytest.mark.parametrize("profile", ["demo", "production"])
def test_every_builtin_kind_stays_done_after_a_code_edit_and_an_operational_change(profile, tmp_path, monkeypatch):
    text = (ROOT / "workflow.yaml").read_text()
    (tmp_path / "workflow.yaml").write_text(text)
    (tmp_path / "datasets_manifest").symlink_to(ROOT / "datasets_manifest")
    wf = load_workflow(tmp_path / "workflow.yaml", profile)
    wf.body.run_dir = str(tmp_path / "runs")
    assert {s.kind.name for s in wf.stages.values()} == set(BUILTIN_STAGE_MODULES)
    _fake_done_run(wf)

    # A comment-only edit of any project module changes every kind's source hash: nothing becomes stale.
    monkeypatch.setattr(StageKind, "code_version", property(lambda self: "0.0.0+edited"))
    statuses = workflow_status(wf)
    assert {n: s.state for n, s in statuses.items()} == dict.fromkeys(wf.stages, "done")
    assert all(s.notes == [f"code changed since it ran (kept; `--force {n}` reruns it)"] for n, s in statuses.items())
    monkeypatch.undo()

    raw = yaml.safe_load(text)
    base = yaml.safe_load(text)
    raw.pop("profiles")
    raw.pop("default_profile", None)
    from simplear.workflow.spec import deep_merge

    resolved = deep_merge(raw, base["profiles"][profile])
    checked = 0
    for name, stage in wf.stages.items():
        for key in sorted(stage.kind.operational):
            changed = json.loads(json.dumps(resolved))
            cfg = changed["stages"][name].setdefault("config", {})
            full = stage.config.model_dump(mode="json")
            new = _other_value(stage.kind.config, full, key, {"datasets": wf.dataset_files, "workflow_dir": wf.base_dir})
            node = cfg
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = new
            (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
            wf2 = load_workflow(tmp_path / "changed.yaml")
            wf2.body.run_dir = wf.body.run_dir
            st = workflow_status(wf2)
            assert {n: s.state for n, s in st.items()} == dict.fromkeys(wf.stages, "done"), (name, key, new)
            checked += 1
    assert checked >= 20
    # and a key that is not operational does make the stage (and what follows) stale
    changed = json.loads(json.dumps(resolved))
    changed["stages"]["filter"]["config"]["min_short_edge"] += 1
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    wf3 = load_workflow(tmp_path / "changed.yaml")
    wf3.body.run_dir = wf.body.run_dir
    st = workflow_status(wf3)
    assert st["filter"].state == "stale" and st["filter"].reasons[0].startswith("config min_short_edge:")
    assert st["tokenize"].reasons == ["input recaption is stale"]


def test_a_manifest_of_the_release_before_is_re_fingerprinted_and_kept(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    wf = load_workflow(path)
    runs = tmp_path / "runs"
    before = {n: json.loads((runs / n / MANIFEST).read_text()) for n in "abcd"}
    # rewrite every manifest as the release before wrote it: its fingerprint hashed the config with the code
    legacy: dict[str, dict] = {}
    for name, stage in wf.stages.items():
        m = dict(before[name])
        for k in ("scheme", "fingerprint_parts", "version"):
            m.pop(k)
        m["code_version"] = "0.1.0+0123456789abcdef"
        m["fingerprint"] = legacy_fingerprint(stage.kind.name, m["config"], m["code_version"],
                                              {n: legacy[n] for n in stage.needs}, {})
        legacy[name] = m
        (runs / name / MANIFEST).write_text(json.dumps(m))
    assert states(path) == dict.fromkeys("abcd", "done")
    run(path)
    after = {n: json.loads((runs / n / MANIFEST).read_text()) for n in "abcd"}
    assert all(after[n]["started_at"] == before[n]["started_at"] for n in "abcd"), "a migrated stage reran"
    assert all(after[n]["scheme"] == SCHEME and after[n]["legacy_fingerprint"] == legacy[n]["fingerprint"] for n in "abcd")
    assert all(after[n]["fingerprint"] == before[n]["fingerprint"] for n in "abcd")

    # an old manifest whose input changed since it ran is stale, with that reason
    m = dict(legacy["b"], fingerprint="0" * 64)
    (runs / "b" / MANIFEST).write_text(json.dumps(m))
    st = workflow_status(load_workflow(path))
    assert st["b"].state == "stale" and "inputs or datasets changed" in st["b"].reasons[0]
    assert st["d"].state == "stale"


# -- selection ---------------------------------------------------------------------------------------


def test_only_on_a_half_done_stage_resumes_and_only_force_starts_afresh(ray_session, tmp_path):
    path = make_workflow(tmp_path, a={"shards": 5, "fail_after": 2})
    with pytest.raises(RunFailed):
        run(path)
    a = tmp_path / "runs/a"
    st = workflow_status(load_workflow(path))["a"]
    assert st.state == "failed" and st.progress == "2 shards written" and "asked to fail after 2" in st.failure["error"]
    path = make_workflow(tmp_path, a={"shards": 5})  # fail_after is operational: the same fingerprint
    assert plan(load_workflow(path), select(load_workflow(path), only="a")) == [("a", "failed", "resume")]
    run(path, only="a")
    log = shard_log(LocalStore(a.parent), "a")
    assert [e["shard"] for e in log] == [0, 1, 2, 3, 4]  # the two shards of the failed try were kept
    assert not (a / ".previous").exists()
    assert states(path)["a"] == "done"

    # half-done again (its outputs moved aside by --force), then --force: it starts afresh
    path = make_workflow(tmp_path, a={"shards": 5, "fail_after": 3})
    with pytest.raises(RunFailed):
        run(path, force=["a"])
    assert sorted(p.name for p in a.glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(3)]
    path = make_workflow(tmp_path, a={"shards": 5})
    run(path, only="a", force=["a"])
    assert len(list((a / ".previous").iterdir())) == 2  # the done outputs, then the half-done ones
    assert len(shard_log(LocalStore(a.parent), "a")) == 5  # all five written again by the forced run


def test_dry_run_refuses_what_a_run_refuses(tmp_path):
    from simplear.config import ConfigError

    path = make_workflow(tmp_path)
    wf = load_workflow(path)
    with pytest.raises(ConfigError, match="'b' needs 'a', which is pending"):
        plan(wf, select(wf, only="b"))
    out = subprocess.run([sys.executable, "-m", "simplear", "run", str(path), "--only", "b", "--dry-run"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}, capture_output=True, text=True)
    assert out.returncode == 2 and "needs 'a', which is pending" in out.stderr


# -- the lock and the fence --------------------------------------------------------------------------


def test_a_second_run_on_the_same_run_dir_refuses_naming_the_first(ray_session, tmp_path):
    path = make_workflow(tmp_path, a={"shards": 5, "seconds_per_shard": 2.0})
    env = {**os.environ, "RAY_ADDRESS": ray_session.address, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "simplear", "run", str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock_file = tmp_path / "runs" / LOCK
        deadline = time.time() + 120
        while "a" not in (json.loads(lock_file.read_text()).get("running", []) if lock_file.exists() else []):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        status = json.loads(status_json(load_workflow(path), workflow_status(load_workflow(path))))["stages"]
        assert status["a"]["state"] == "running"
        with pytest.raises(RunLocked, match=f"pid {first.pid}"):
            plan(load_workflow(path), select(load_workflow(path)))  # --dry-run refuses too
        second = subprocess.run([sys.executable, "-m", "simplear", "run", str(path)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 3
        assert "is in use by run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert states(path) == dict.fromkeys("abcd", "done") and not lock_file.exists()


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"run_id": "old", "host": socket.gethostname(), "pid": dead.pid,
                                            "heartbeat": time.time(), "started_at": time.time()}))
    lock = RunLock.acquire(run_dir, LockSettings())
    try:
        assert lock.holds() and json.loads((run_dir / LOCK).read_text())["run_id"] == lock.run_id
    finally:
        lock.release()
    # on another host only the lock's own changes tell, timed by the taker's clock, never by the holder's
    # heartbeat field: a lock that keeps changing is alive although its clock says 1970 ...
    stop = threading.Event()

    def beating() -> None:
        n = 0
        while not stop.wait(0.3):
            n += 1
            (run_dir / LOCK).write_text(json.dumps({"run_id": "far", "host": "elsewhere", "pid": 1, "heartbeat": n}))

    (run_dir / LOCK).write_text(json.dumps({"run_id": "far", "host": "elsewhere", "pid": 1, "heartbeat": 0}))
    beat = threading.Thread(target=beating)
    beat.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match="run far.*its lock changed"):
            RunLock.acquire(run_dir, LockSettings(stale_after_s=30))
        assert time.monotonic() - t0 < 5  # refused at its first heartbeat, not after stale_after_s
    finally:
        stop.set()
        beat.join()
    # ... and one that stays still for stale_after_s is dead although its clock says the far future
    (run_dir / LOCK).write_text(json.dumps({"run_id": "far", "host": "elsewhere", "pid": 1, "heartbeat": 1e12}))
    t0 = time.monotonic()
    RunLock.acquire(run_dir, LockSettings(stale_after_s=2)).release()
    assert time.monotonic() - t0 >= 2


def test_a_writer_fenced_out_commits_nothing(tmp_path):
    path = make_workflow(tmp_path)
    with holding_run_dir(load_workflow(path)) as lock:
        with atomic_path(tmp_path / "runs" / "ok.txt") as tmp:
            tmp.write_text("held")
        lock_file = tmp_path / "runs" / LOCK
        lock_file.write_text(json.dumps({**json.loads(lock_file.read_text()), "run_id": "someone-else"}))
        with pytest.raises(FencedOut, match="lost the lock"):
            with atomic_path(tmp_path / "runs" / "late.txt") as tmp:
                tmp.write_text("too late")
    assert (tmp_path / "runs" / "ok.txt").exists() and not (tmp_path / "runs" / "late.txt").exists()
    assert not list((tmp_path / "runs").glob(".tmp-*"))
    assert lock_file.exists()  # not ours any more: release leaves it


def test_a_stage_task_whose_run_lost_the_lock_stops_writing(ray_session, tmp_path):
    path = make_workflow(tmp_path, a={"shards": 8, "seconds_per_shard": 1.0})
    wf = load_workflow(path)
    errors: list[BaseException] = []

    def drive():
        try:
            run_workflow(wf, select(wf, only="a"))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    t = threading.Thread(target=drive)
    t.start()
    a = tmp_path / "runs/a"
    deadline = time.time() + 120
    while len(list(a.glob("*.parquet"))) < 2:
        assert time.time() < deadline and t.is_alive()
        time.sleep(0.1)
    lock_file = tmp_path / "runs" / LOCK
    lock_file.write_text(json.dumps({**json.loads(lock_file.read_text()), "run_id": "the-taker"}))
    written_at_takeover = len(list(a.glob("*.parquet")))
    t.join(timeout=120)
    assert not t.is_alive() and errors
    assert isinstance(errors[0], (FencedOut, RunFailed))
    n = len(list(a.glob("*.parquet")))
    assert n <= written_at_takeover + 1 < 8  # at most the shard already past its check
    assert not (a / MANIFEST).exists()


# -- status ------------------------------------------------------------------------------------------


def test_status_shows_reasons_rows_and_what_to_open(ray_session, tmp_path):
    path = make_workflow(tmp_path)
    run(path)
    wf = load_workflow(path)
    manifest = json.loads((tmp_path / "runs/a" / MANIFEST).read_text())
    manifest["artifacts"] = ["part-00000.parquet"]
    (tmp_path / "runs/a" / MANIFEST).write_text(json.dumps(manifest))
    path = make_workflow(tmp_path, c={"value": 3})
    wf = load_workflow(path)
    text = format_status(wf, workflow_status(wf))
    assert "config value: (default) -> 3" in text and "input c is stale" in text
    assert "a/part-00000.parquet" in text.split("open (under")[1]
    data = json.loads(status_json(wf, workflow_status(wf)))["stages"]
    assert data["a"]["rows_kept"] == 8 and data["c"]["state"] == "stale" and data["a"]["artifacts"] == ["a/part-00000.parquet"]


def test_clean_removes_what_reruns_moved_aside_and_keep_previous_false_keeps_none(ray_session, tmp_path, capsys):
    from simplear.cli import main

    path = make_workflow(tmp_path)
    run(path)
    run(make_workflow(tmp_path, b={"value": 1}))
    moved = sum(f.stat().st_size for f in (tmp_path / "runs").rglob(".previous/**/*") if f.is_file())
    assert moved > 0
    assert main(["clean", str(path)]) == 0
    out = capsys.readouterr().out
    assert "b: removed 1 set(s) of previous outputs" in out and "d: removed 1 set(s)" in out
    assert f"freed {moved / 2**20:.1f} MiB" in out
    assert not list((tmp_path / "runs").rglob(".previous"))

    body = yaml.safe_load(make_workflow(tmp_path, b={"value": 2}).read_text())
    path.write_text(yaml.safe_dump({**body, "keep_previous": False}))
    run(path)
    assert values(tmp_path / "runs/b")[0] == 2000 + sum(range(8))
    assert not list((tmp_path / "runs").rglob(".previous"))
