"""Run a resolved workflow on Ray: each stage is one Ray task named after it, launched once its needs are done.

State lives in each stage's folder (see manifest.py, status.py), so any driver, local or under `ray job
submit`, can pick a run up where a killed one stopped: finished stages are skipped by fingerprint, a
half-done stage resumes on what it already wrote. One run at a time holds the run dir (lock.py);
before a stage reruns, its old outputs are moved aside (previous.py), never deleted silently.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from simplear.config import ConfigError
from simplear.observability.logs import VERBOSE_ENV, is_verbose, quiet_env, quiet_libraries, set_verbose
from simplear.ray_env import init_ray, ray_data_expiry
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.fingerprint import SCHEME
from simplear.workflow.lock import FENCE_ENV, RunLock, RunLocked, describe_holder, read_lock
from simplear.storage import Store, join
from simplear.workflow.manifest import FAILED, MANIFEST, STARTED, commit_json, describe_outputs
from simplear.workflow.preflight import check_every_node_sees_the_run
from simplear.workflow.previous import move_aside
from simplear.workflow.ray_session import claim_session
from simplear.workflow.spec import RaySettings, ResolvedWorkflow
from simplear.workflow.status import StageStatus, headline, stage_status, workflow_status

log = logging.getLogger("simplear.engine")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Selection:
    """Which stages a run considers (`run`), which of them rerun when done (`chosen`: named by --only/--from;
    a half-done one resumes) and which start afresh whatever their state (`forced`)."""

    run: list[str]
    chosen: set[str] = field(default_factory=set)
    forced: set[str] = field(default_factory=set)


def select(wf: ResolvedWorkflow, from_: str | None = None, only: str | None = None, force: Iterable[str] = ()) -> Selection:
    force = list(force)
    for flag, name in [("--from", from_), ("--only", only)] + [("--force", f) for f in force]:
        if name is not None and name not in wf.stages:
            raise ConfigError(f"{flag} {name}: no such stage (stages: {', '.join(wf.stages)})")
    if from_ and only:
        raise ConfigError("--from and --only cannot be combined")
    forced = set(force)
    if only:
        return Selection(run=[only], chosen={only}, forced=forced & {only})
    if from_:
        run = wf.downstream(from_)
        return Selection(run=run, chosen=set(run), forced=forced & set(run))
    return Selection(run=list(wf.stages), forced=forced)


def check_needs(wf: ResolvedWorkflow, selection: Selection, statuses: dict[str, StageStatus]) -> None:
    """What a run refuses before it starts: a chosen stage whose needs are outside the run and not done."""
    for name in selection.run:
        for need in wf.stages[name].needs:
            if need not in selection.run and statuses[need].state != "done":
                raise ConfigError(f"stage {name!r} needs {need!r}, which is {statuses[need].state}: run it first")


def _action(st: StageStatus, selection: Selection, upstream_runs: bool) -> str:
    """skip | run | resume | refresh | rerun: what a run does with a stage in this state."""
    if st.name in selection.forced:
        return "rerun"
    if st.state == "done" or st.refresh:
        if st.name in selection.chosen:
            return "rerun"
        if st.refresh:
            return "refresh"
        return "run" if upstream_runs else "skip"
    started = st.started or {}
    if st.manifest is None and started and (started.get("fingerprint") == st.fingerprint or started.get("scheme") != SCHEME):
        return "resume"
    return "run"


def check_kinds_fit_storage(wf: ResolvedWorkflow, selection: Selection) -> None:
    """Refuse, before any work, to run a stage kind that still writes its run dir as a local folder when the run
    dir is on object storage (it would fail at its first write, or write to a node's disk)."""
    if wf.store.is_local:
        return
    folder_only = [n for n in selection.run if not wf.stages[n].kind.object_store]
    if folder_only:
        raise ConfigError(f"run_dir {wf.run_uri}: stages {', '.join(folder_only)} (kinds "
                          f"{', '.join(sorted({wf.stages[n].kind.name for n in folder_only}))}) write their run dir as "
                          "a folder and cannot run on object storage yet: give them a run dir on a POSIX file system "
                          "every node mounts")


def plan(wf: ResolvedWorkflow, selection: Selection) -> list[tuple[str, str, str]]:
    """(stage, current state, action) for a dry run; refuses what a real run would refuse."""
    statuses = workflow_status(wf)
    check_needs(wf, selection, statuses)
    check_kinds_fit_storage(wf, selection)
    holder, alive = read_lock(wf.store, wf.body.lock)
    if alive:
        raise RunLocked(f"{wf.run_uri} is in use by {describe_holder(holder)}: a run now would refuse")
    rows = []
    will_run: set[str] = set()
    for name in selection.run:
        action = _action(statuses[name], selection, bool(will_run.intersection(wf.stages[name].needs)))
        if action != "skip":
            will_run.add(name)
        rows.append((name, statuses[name].state, action))
    return rows


def connect_ray(settings: RaySettings, metadata: dict[str, str], extra_sys_path: list[str]) -> str | None:
    """Attach to the cluster of `ray job submit` (RAY_ADDRESS) or `ray.address`; otherwise start an embedded Ray.

    Returns the embedded Ray's session dir (what a run that takes over a dead one's lock ends), else None."""
    import ray

    if ray.is_initialized():
        return None
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
    if is_verbose():
        env_vars[VERBOSE_ENV] = "1"
    if address and not under_job:
        # Ray Train's helpers find "their" cluster through RAY_ADDRESS (else /tmp/ray): with several
        # clusters on one host they could pick another one and tear down this run's placement group.
        env_vars["RAY_ADDRESS"] = address
    from simplear.serving.auth import take_api_keys_from_env  # serving (issue 19): no worker inherits the API keys;
    take_api_keys_from_env()  # the serve stage gets them with its pickled ServeConfig
    if address:
        log.info("attaching to Ray at %s", address)
        init_ray(address, env_vars, **kwargs)
        return None
    else:
        log.info("starting an embedded Ray")
        init_ray(
            None,  # a Ray of its own, even when another cluster runs on this host
            env_vars,
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            include_dashboard=settings.include_dashboard,
            object_store_memory=int(settings.object_store_memory) if settings.object_store_memory else None,
            **kwargs,
        )
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    if settings.include_dashboard is not False:  # Ray's metrics head (and its Grafana folder) come with the dashboard
        from simplear.observability.dashboards import install_in_session

        install_in_session(session_dir)
    return session_dir


def _execute_stage(ctx: StageContext, plugins: list[str]) -> dict:
    """Body of a stage's Ray task: run the stage, then write its manifest last and atomically."""
    import ray.data  # noqa: F401 - configures its loggers on import: before quiet_libraries sets them

    from simplear.devices import describe_hardware  # torch: imported in the stage's task, not by `simplear status`
    from simplear.workflow.registry import get_stage_kind, import_plugins

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_libraries()
    import_plugins(plugins)
    kind = get_stage_kind(ctx.kind)
    started = ctx.store.read_json(ctx.key(STARTED)) or {}
    t0 = time.time()
    sources = kind.sources(ctx.config, ctx.dataset_files) if kind.sources else None  # as they were when it began
    result = kind.run(ctx) or StageResult()
    t1 = time.time()
    outputs = describe_outputs(ctx.store, ctx.name, result.outputs, known=result.files)
    manifest = {
        "stage": ctx.name,
        "kind": ctx.kind,
        "scheme": SCHEME,
        "fingerprint": ctx.fingerprint,
        "fingerprint_parts": ctx.fingerprint_parts,
        "version": kind.version,
        "code_version": kind.code_version,
        "config": ctx.config.model_dump(mode="json"),
        "resources": ctx.resources.model_dump(mode="json"),
        "needs": ctx.needs,
        "profile": ctx.profile,
        "workflow": str(ctx.workflow_path),
        "outputs": outputs,
        "rows": sum(o.get("rows") or 0 for o in outputs),
        "metrics": result.metrics,
        "artifacts": result.artifacts,
        "hardware": describe_hardware(),
        **({"sources": sources} if sources is not None else {}),
        "first_started_at": started.get("started_at", t0),
        "started_at": t0,
        "finished_at": t1,
        "duration_s": round(t1 - t0, 3),
    }
    commit_json(ctx.store, ctx.key(MANIFEST), manifest)
    return manifest


class RunFailed(RuntimeError):
    pass


def prepare_stage_dir(store: Store, st: StageStatus, action: str, reason: str, keep_previous: bool) -> None:
    """Resume on what a previous try of this very fingerprint left; refresh in place (sources changed);
    otherwise move the old outputs aside first."""
    started = st.started or {}
    if action == "resume":
        if started.get("scheme") != SCHEME:
            log.warning("%s: resuming on what a run before the upgrade left (its fingerprint cannot be checked; "
                        "`--force %s` starts afresh)", st.name, st.name)
        else:
            log.info("%s: resuming on what a previous run left", st.name)
        store.delete(join(st.name, FAILED))
        return
    if action == "refresh":  # outputs kept; no manifest until it finishes again, so a kill leaves it partial
        log.info("%s: refreshing in place (%s)", st.name, "; ".join(st.reasons[:3]))
        store.delete(join(st.name, MANIFEST))
    else:
        old = (st.manifest or started).get("fingerprint") or "unknown"
        move_aside(store, st.name, old[:16], reason, keep=keep_previous)
    commit_json(store, join(st.name, STARTED), {"scheme": SCHEME, "fingerprint": st.fingerprint, "started_at": time.time()})


@contextmanager
def holding_run_dir(wf: ResolvedWorkflow, purpose: str = "run") -> Iterator[RunLock]:
    """Hold the run dir's lock; meanwhile this process, and every task it launches, is fenced by its run id."""
    lock = RunLock.acquire(wf.store, wf.body.lock, purpose)
    saved = os.environ.get(FENCE_ENV)
    os.environ[FENCE_ENV] = lock.fence_token
    try:
        yield lock
    finally:
        if saved is None:
            os.environ.pop(FENCE_ENV, None)
        else:
            os.environ[FENCE_ENV] = saved
        lock.release()


def run_workflow(wf: ResolvedWorkflow, selection: Selection) -> dict[str, StageStatus]:
    """Run what the selection asks; independent stages run side by side. Raises RunFailed if a stage fails."""
    with holding_run_dir(wf) as lock:
        return _run(wf, selection, lock)


def _why_rerun(st: StageStatus, action: str, selection: Selection) -> str:
    if action == "rerun":
        return "forced (--force)" if st.name in selection.forced else "chosen by --only/--from"
    if st.state == "stale":
        return "stale: " + "; ".join(st.reasons[:3])
    return "partial outputs of another configuration"


def _run(wf: ResolvedWorkflow, selection: Selection, lock: RunLock) -> dict[str, StageStatus]:
    import ray

    check_kinds_fit_storage(wf, selection)
    statuses = workflow_status(wf)
    check_needs(wf, selection, statuses)
    for st in statuses.values():
        if st.migrated:
            commit_json(wf.store, join(st.name, MANIFEST), st.manifest)
            log.info("%s: manifest from an older simplear re-fingerprinted; still done", st.name)

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
            st = stage_status(wf, name, statuses, (lock.info, True))
            statuses[name] = st
            action = _action(st, selection, upstream_runs=False)
            if action == "skip":
                log.info("%s: up to date, skipped (rows=%s)", name, st.rows)
                finished.add(name)
                continue
            if st.fingerprint is None:
                failed.append(name)
                log.error("%s: an input is not done, cannot run", name)
                continue
            if remote is None:
                session_dir = connect_ray(
                    wf.body.ray,
                    metadata={"simplear_workflow": str(wf.path), "simplear_profile": wf.profile},
                    extra_sys_path=[str(wf.base_dir)] if wf.body.plugins else [],
                )
                if session_dir:
                    lock.update(ray_session=claim_session(session_dir))
                else:  # a cluster: every node must see the run dir before any stage writes to it
                    check_every_node_sees_the_run(wf.store, lock.run_id)
                remote = ray.remote(_execute_stage)
            prepare_stage_dir(wf.store, st, action, _why_rerun(st, action, selection), wf.body.keep_previous)
            ctx = StageContext(
                name=name,
                kind=stage.kind.name,
                config=stage.config,
                resources=stage.resources,
                stage_dir=wf.stage_dir(name) if wf.store.is_local else None,
                run_dir=wf.run_dir if wf.store.is_local else None,
                run_uri=wf.run_uri,
                needs=stage.needs,
                fingerprint=st.fingerprint,
                fingerprint_parts=st.parts,
                dataset_files=wf.dataset_files,
                workflow_path=wf.path,
                profile=wf.profile,
                interactive=sys.stderr.isatty(),
                progress_interval_s=wf.body.progress_interval_s,
            )
            log.info("%s: %s (%s%s)", name, action, st.state, f": {'; '.join(st.reasons[:3])}" if st.reasons else "")
            # the fencing token travels with the stage task to every task and actor it starts
            env_vars = {FENCE_ENV: lock.fence_token, **ray_data_expiry()}
            ref = remote.options(name=f"stage:{name}", num_cpus=0, max_retries=0,
                                 runtime_env={"env_vars": env_vars}).remote(ctx, wf.body.plugins)
            running[ref] = name
            lock.update(running=sorted(running.values()))
        if not running:
            if todo:
                log.error("not run because an input failed: %s", ", ".join(todo))
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(ready[0])
        lock.update(running=sorted(running.values()))
        try:
            manifest = ray.get(ready[0])
        except Exception as e:  # a stage failure is recorded, the run stops launching new stages
            failed.append(name)
            cause = getattr(e, "cause", None) or e
            commit_json(
                wf.store, join(name, FAILED),
                {"error": f"{type(cause).__name__}: {cause}", "traceback": traceback.format_exc(), "at": time.time()},
            )
            log.error("%s: failed: %s", name, cause)
            continue
        finished.add(name)
        statuses = workflow_status(wf)
        log.info("%s: done in %.1fs: %s", name, manifest["duration_s"], headline(manifest) or f"{len(manifest['outputs'])} outputs")

    log.info("workflow finished in %.1fs", time.time() - t_run)
    statuses = workflow_status(wf)
    write_report(wf, statuses)
    if failed:
        raise RunFailed(f"stages failed: {', '.join(failed)} (see {FAILED} in their folders)")
    return statuses


def write_report(wf: ResolvedWorkflow, statuses: dict[str, StageStatus]) -> None:
    """The run's report page, after every run: a report that cannot be written costs a warning, not the run."""
    from simplear.observability.report import write_run_report

    try:
        log.info("report: %s", write_run_report(wf, statuses))
    except Exception as e:  # noqa: BLE001 - the stages' results are already committed
        log.warning("the run report was not written: %s: %s", type(e).__name__, e)


def configure_logging(verbose: bool = False) -> None:
    """The driver's console; `verbose`: DEBUG here, and other libraries' INFO lines in every process of the run."""
    set_verbose(verbose)
    quiet_env()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    quiet_libraries()
