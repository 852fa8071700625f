"""Run a resolved workflow on Ray: each stage is one Ray task named after it, launched once its needs are done.

State lives in each stage's folder (see manifest.py), so any driver, local or under `ray job submit`,
can pick a run up where a killed one stopped: finished stages are skipped by fingerprint, a
half-done stage resumes on the shards it already wrote.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from simplear.config import ConfigError
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.manifest import (
    FAILED,
    MANIFEST,
    STARTED,
    atomic_write_json,
    describe_outputs,
    file_digest,
    fingerprint,
    read_json,
    reset_dir,
)
from simplear.workflow.spec import RaySettings, ResolvedStage, ResolvedWorkflow

log = logging.getLogger("simplear.engine")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class StageStatus:
    name: str
    state: str  # done | stale | pending | failed
    fingerprint: str | None
    manifest: dict | None
    failure: dict | None

    @property
    def rows(self) -> int | None:
        return self.manifest.get("rows") if self.manifest else None

    @property
    def duration_s(self) -> float | None:
        return self.manifest.get("duration_s") if self.manifest else None


def _datasets_used(wf: ResolvedWorkflow, config: Any) -> dict[str, str]:
    """Hashes of the dataset manifests a stage's config names: editing one makes the stage stale."""
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and value in wf.dataset_files:
            names.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(config)
    return {n: file_digest(wf.dataset_files[n]) for n in sorted(names)}


def stage_fingerprint(wf: ResolvedWorkflow, stage: ResolvedStage, inputs: dict[str, dict]) -> str:
    config = stage.config.model_dump(mode="json")
    return fingerprint(stage.kind.name, config, stage.kind.code_version, inputs, _datasets_used(wf, config))


def stage_status(wf: ResolvedWorkflow, name: str, upstream: dict[str, StageStatus]) -> StageStatus:
    stage = wf.stages[name]
    stage_dir = wf.stage_dir(name)
    manifest = read_json(stage_dir / MANIFEST)
    failure = read_json(stage_dir / FAILED)
    fp = None
    if all(upstream[n].state == "done" for n in stage.needs):
        fp = stage_fingerprint(wf, stage, {n: upstream[n].manifest for n in stage.needs})
    if manifest is None:
        state = "failed" if failure else "pending"
    elif fp is not None and manifest.get("fingerprint") == fp:
        state = "done"
    else:
        state = "stale"
    return StageStatus(name, state, fp, manifest, failure)


def workflow_status(wf: ResolvedWorkflow) -> dict[str, StageStatus]:
    statuses: dict[str, StageStatus] = {}
    for name in wf.stages:
        statuses[name] = stage_status(wf, name, statuses)
    return statuses


@dataclass
class Selection:
    """Which stages a run considers and which it reruns whatever their state."""

    run: list[str]
    forced: set[str]


def select(wf: ResolvedWorkflow, from_: str | None = None, only: str | None = None, force: Iterable[str] = ()) -> Selection:
    force = list(force)
    for flag, name in [("--from", from_), ("--only", only)] + [("--force", f) for f in force]:
        if name is not None and name not in wf.stages:
            raise ConfigError(f"{flag} {name}: no such stage (stages: {', '.join(wf.stages)})")
    if from_ and only:
        raise ConfigError("--from and --only cannot be combined")
    forced = set(force)
    if only:
        return Selection(run=[only], forced=forced | {only})
    if from_:
        forced |= set(wf.downstream(from_))
    return Selection(run=list(wf.stages), forced=forced)


def plan(wf: ResolvedWorkflow, selection: Selection) -> list[tuple[str, str, str]]:
    """(stage, current state, action) for a dry run: action is run, rerun (forced) or skip."""
    statuses = workflow_status(wf)
    rows = []
    will_run: set[str] = set()
    for name in selection.run:
        st = statuses[name]
        upstream_runs = bool(will_run.intersection(wf.stages[name].needs))
        if name in selection.forced:
            action = "rerun"
        elif st.state != "done" or upstream_runs:
            action = "run"
        else:
            action = "skip"
        if action != "skip":
            will_run.add(name)
        rows.append((name, st.state, action))
    return rows


def connect_ray(settings: RaySettings, metadata: dict[str, str], extra_sys_path: list[str]) -> None:
    """Attach to the cluster of `ray job submit` (RAY_ADDRESS) or `ray.address`; otherwise start an embedded Ray."""
    import ray

    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"namespace": "simplear", "log_to_driver": True}
    under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if not under_job:  # a submitted job already carries its metadata
        kwargs["job_config"] = ray.job_config.JobConfig(metadata=metadata)
    env_vars: dict[str, str] = {}
    if extra_sys_path:
        # Workers import plugin stage kinds by module name. Under a job their cwd is the uploaded
        # working dir, so paths inside it are given relative to it and hold on every node.
        cwd = Path.cwd()
        entries = [os.path.relpath(p, cwd) if under_job and Path(p).is_relative_to(cwd) else p for p in extra_sys_path]
        env_vars["PYTHONPATH"] = os.pathsep.join(entries + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if address and not under_job:
        # Ray Train's helpers find "their" cluster through RAY_ADDRESS (else /tmp/ray): with several
        # clusters on one host they could pick another one and tear down this run's placement group.
        env_vars["RAY_ADDRESS"] = address
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting an embedded Ray")
        ray.init(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            include_dashboard=settings.include_dashboard,
            object_store_memory=int(settings.object_store_memory) if settings.object_store_memory else None,
            **kwargs,
        )


def _execute_stage(ctx: StageContext, plugins: list[str]) -> dict:
    """Body of a stage's Ray task: run the stage, then write its manifest last and atomically."""
    from simplear.workflow.registry import get_stage_kind, import_plugins

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    import_plugins(plugins)
    kind = get_stage_kind(ctx.kind)
    started = read_json(ctx.stage_dir / STARTED) or {}
    t0 = time.time()
    result = kind.run(ctx) or StageResult()
    t1 = time.time()
    outputs = describe_outputs(ctx.stage_dir, result.outputs)
    manifest = {
        "stage": ctx.name,
        "kind": ctx.kind,
        "fingerprint": ctx.fingerprint,
        "code_version": kind.code_version,
        "config": ctx.config.model_dump(mode="json"),
        "resources": ctx.resources.model_dump(mode="json"),
        "needs": ctx.needs,
        "profile": ctx.profile,
        "workflow": str(ctx.workflow_path),
        "outputs": outputs,
        "rows": sum(o.get("rows") or 0 for o in outputs),
        "metrics": result.metrics,
        "first_started_at": started.get("started_at", t0),
        "started_at": t0,
        "finished_at": t1,
        "duration_s": round(t1 - t0, 3),
    }
    atomic_write_json(ctx.stage_dir / MANIFEST, manifest)
    return manifest


class RunFailed(RuntimeError):
    pass


def _prepare_stage_dir(stage_dir: Path, fp: str, forced: bool) -> None:
    """Keep shards only when they were written for this very fingerprint (a resumed run); otherwise start clean."""
    started = read_json(stage_dir / STARTED)
    stale_manifest = (stage_dir / MANIFEST).exists()
    if forced or stale_manifest or not started or started.get("fingerprint") != fp:
        reset_dir(stage_dir)
    else:
        log.info("%s: resuming on the shards a previous run left", stage_dir.name)
        (stage_dir / FAILED).unlink(missing_ok=True)
        return
    atomic_write_json(stage_dir / STARTED, {"fingerprint": fp, "started_at": time.time()})


def run_workflow(wf: ResolvedWorkflow, selection: Selection) -> dict[str, StageStatus]:
    """Run what the selection asks; independent stages run side by side. Raises RunFailed if a stage fails."""
    import ray

    statuses = workflow_status(wf)
    for name in selection.run:
        for need in wf.stages[name].needs:
            if need not in selection.run and statuses[need].state != "done":
                raise ConfigError(f"stage {name!r} needs {need!r}, which is {statuses[need].state}: run it first")

    remote = None  # Ray starts (or is attached) only once a stage really has to run
    todo = list(selection.run)
    finished: set[str] = set()
    running: dict[Any, str] = {}
    failed: list[str] = []
    t_run = time.time()

    while todo or running:
        for name in list(todo):
            stage = wf.stages[name]
            if not all(n in finished or n not in selection.run for n in stage.needs):
                continue
            todo.remove(name)
            st = stage_status(wf, name, statuses)
            statuses[name] = st
            if st.state == "done" and name not in selection.forced:
                log.info("%s: up to date, skipped (rows=%s)", name, st.rows)
                finished.add(name)
                continue
            if st.fingerprint is None:
                failed.append(name)
                log.error("%s: an input is not done, cannot run", name)
                continue
            if remote is None:
                connect_ray(
                    wf.body.ray,
                    metadata={"simplear_workflow": str(wf.path), "simplear_profile": wf.profile},
                    extra_sys_path=[str(wf.base_dir)] if wf.body.plugins else [],
                )
                remote = ray.remote(_execute_stage)
            _prepare_stage_dir(wf.stage_dir(name), st.fingerprint, forced=name in selection.forced)
            ctx = StageContext(
                name=name,
                kind=stage.kind.name,
                config=stage.config,
                resources=stage.resources,
                stage_dir=wf.stage_dir(name),
                run_dir=wf.run_dir,
                needs=stage.needs,
                fingerprint=st.fingerprint,
                dataset_files=wf.dataset_files,
                workflow_path=wf.path,
                profile=wf.profile,
            )
            log.info("%s: %s (%s)", name, "rerun (forced)" if name in selection.forced else "run", st.state)
            ref = remote.options(name=f"stage:{name}", num_cpus=0, max_retries=0).remote(ctx, wf.body.plugins)
            running[ref] = name
        if not running:
            if todo:
                log.error("not run because an input failed: %s", ", ".join(todo))
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(ready[0])
        try:
            manifest = ray.get(ready[0])
        except Exception as e:  # a stage failure is recorded, the run stops launching new stages
            failed.append(name)
            cause = getattr(e, "cause", None) or e
            atomic_write_json(
                wf.stage_dir(name) / FAILED,
                {"error": f"{type(cause).__name__}: {cause}", "traceback": traceback.format_exc(), "at": time.time()},
            )
            log.error("%s: failed: %s", name, cause)
            continue
        finished.add(name)
        statuses = workflow_status(wf)
        log.info("%s: done in %.1fs, rows=%s, outputs=%d", name, manifest["duration_s"], manifest["rows"], len(manifest["outputs"]))

    log.info("workflow finished in %.1fs", time.time() - t_run)
    statuses = workflow_status(wf)
    if failed:
        raise RunFailed(f"stages failed: {', '.join(failed)} (see {FAILED} in their folders)")
    return statuses


def format_status(wf: ResolvedWorkflow, statuses: dict[str, StageStatus]) -> str:
    header = ("stage", "state", "rows", "duration_s", "manifest")
    rows = [header]
    for name, st in statuses.items():
        rows.append(
            (
                name,
                st.state,
                "" if st.rows is None else str(st.rows),
                "" if st.duration_s is None else f"{st.duration_s:.1f}",
                str(wf.stage_dir(name) / MANIFEST) if st.manifest else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def status_json(statuses: dict[str, StageStatus]) -> str:
    return json.dumps(
        {n: {"state": s.state, "rows": s.rows, "duration_s": s.duration_s} for n, s in statuses.items()}, indent=2
    )


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
