"""`simplear`: run, inspect and submit workflows (and, from the model core, generate images)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from simplear.cli_checkpoints import VT_HELP, add_checkpoint_commands
from simplear.config import ConfigError

log = logging.getLogger("simplear")


def _load(args):
    from simplear.workflow.spec import check_run_dir, load_workflow

    wf = load_workflow(args.workflow, args.profile)
    if getattr(args, "run_dir", None):
        try:
            wf.body.run_dir = check_run_dir(args.run_dir)
        except ValueError as e:
            raise ConfigError(f"--run-dir: {e}") from None
    return wf


def cmd_run(args) -> int:
    from simplear.workflow.engine import RunFailed, plan, run_workflow, select
    from simplear.workflow.status import format_status

    wf = _load(args)
    selection = select(wf, from_=args.from_, only=args.only, force=args.force)
    log.info("workflow %s, profile %s, run_dir %s", wf.path, wf.profile or "-", wf.run_uri)
    if args.dry_run:
        for name, state, action in plan(wf, selection):
            print(f"{name:<16} {state:<8} {action}")
        return 0
    try:
        statuses = run_workflow(wf, selection)
    except RunFailed as e:
        log.error("%s", e)
        return 1
    print(format_status(wf, statuses))
    return 0


def cmd_status(args) -> int:
    from simplear.workflow.status import format_status, status_json, workflow_status

    wf = _load(args)
    statuses = workflow_status(wf)
    print(status_json(wf, statuses) if args.json else format_status(wf, statuses))
    return 0


def cmd_report(args) -> int:
    from simplear.observability.report import write_run_report

    print(write_run_report(_load(args)))
    return 0


def cmd_clean(args) -> int:
    from simplear.workflow.engine import holding_run_dir
    from simplear.workflow.previous import clean

    wf = _load(args)
    total = 0
    with holding_run_dir(wf, purpose="clean"):
        for name in wf.stages:
            sets, freed = clean(wf.store, name)
            if sets:
                print(f"{name}: removed {sets} set(s) of previous outputs, {freed / 2**20:.1f} MiB")
            total += freed
    print(f"freed {total / 2**20:.1f} MiB under {wf.run_uri}")
    return 0


def _selection_args(args) -> list[str]:
    out = []
    if args.from_:
        out += ["--from", args.from_]
    if args.only:
        out += ["--only", args.only]
    for name in args.force:
        out += ["--force", name]
    return out


def cmd_submit(args) -> int:
    from ray.exceptions import AuthenticationError

    from simplear.jobs import RUNTIME_ENV_FILE, follow, plan_upload, submit
    from simplear.storage import is_uri
    from simplear.workflow.engine import select

    wf = _load(args)  # fail here, before anything is uploaded, on a bad workflow or selection
    select(wf, from_=args.from_, only=args.only, force=args.force)
    if not Path(wf.body.run_dir).is_absolute() and not is_uri(wf.body.run_dir) and not args.run_dir_in_job:
        print(f"error: run_dir {wf.body.run_dir!r} is relative: under a job it would lie in the job's working dir, "
              "on whichever node runs the driver, and be lost when the job ends. Give --run-dir an absolute path "
              "every node mounts (or pass --run-dir-in-job to keep it there)", file=sys.stderr)
        return 2
    job_args = (["--profile", wf.profile] if wf.profile else []) + (["--run-dir", args.run_dir] if args.run_dir else [])
    job_args += _selection_args(args)
    upload = plan_upload(args.workflow)
    if refusal := upload.refusal():
        if not args.yes:
            print(f"error: {refusal}.\nKeep the workflow in a project folder, exclude what the job does not need "
                  f"({RUNTIME_ENV_FILE}'s excludes, a .gitignore or .rayignore), or pass --yes to upload anyway.",
                  file=sys.stderr)
            return 2
        log.warning("uploading anyway (--yes): %s", refusal)
    try:
        job_id = submit(upload, args.address, job_args,
                        metadata={"simplear_workflow": str(wf.path.name), "simplear_profile": wf.profile})
    except (AuthenticationError, ConnectionError) as e:
        print(f"error: cannot submit to {args.address}: {e}", file=sys.stderr)
        return 2
    print(job_id)
    print(f"dashboard: {args.address.rstrip('/')}/#/jobs/{job_id}", flush=True)
    if args.wait:
        status = follow(args.address, job_id)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args) -> int:
    from ray.exceptions import AuthenticationError

    from simplear.jobs import follow, job_client

    try:
        client = job_client(args.address)
        if args.action == "list":
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
            for j in jobs:
                meta = j.metadata or {}
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
                workflow = meta.get("simplear_workflow", "-")
                print(f"{j.submission_id or j.job_id:<28} {j.status.value:<10} {started}  {workflow} {meta.get('simplear_profile', '')}")
            return 0
        if not args.job_id:
            print(f"error: simplear jobs {args.action} needs a job id", file=sys.stderr)
            return 2
        if args.action == "logs":
            if args.follow:
                return 0 if follow(args.address, args.job_id) == "SUCCEEDED" else 1
            print(client.get_job_logs(args.job_id), end="")
            return 0
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
        return 0
    except (AuthenticationError, ConnectionError) as e:
        print(f"error: cannot reach {args.address}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the jobs API's answer to an unknown job id
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_dashboards(args) -> int:
    from simplear.observability.dashboards import install_dashboard

    print(install_dashboard(Path(args.dest)))
    return 0


def cmd_serve(args) -> int:
    import os
    import time

    from simplear.serving import (ServeConfig, load_api_keys, read_checkpoint_meta, resolve_checkpoint, start,
                                  take_api_keys_from_env)

    cpus, gpus, replicas, run_dir, needs = 1.0, 0.0, 1, None, None
    base: dict = {}
    if args.workflow:  # the workflow's serve stage: its config, resources and the checkpoint of its run
        wf = _load(args)
        serve_stages = [n for n, st in wf.stages.items() if st.kind.name == "serve"]
        name = args.stage or next(iter(serve_stages), None)
        if name not in serve_stages:
            what = f"no stage {name!r} of kind serve" if name else "no stage of kind serve"
            raise ConfigError(f"{wf.path}: {what} (serve stages: {', '.join(serve_stages) or 'none'})")
        stage = wf.stages[name]
        base = stage.config.model_dump()
        cpus, gpus, replicas = stage.resources.cpus, stage.resources.gpus, stage.resources.concurrency
        run_dir, needs = wf.run_uri, stage.needs
    elif not args.model:
        print("error: give a workflow (its serve stage) or --model CHECKPOINT", file=sys.stderr)
        return 2
    from simplear.release import visual_tokenizer_arg

    vt = visual_tokenizer_arg(args.visual_tokenizer).model_dump() if args.visual_tokenizer else None
    overrides = {"checkpoint": args.model, "visual_tokenizer": vt, "engine": args.engine, "host": args.host, "port": args.port,
                 "sjd_window": args.sjd_window, "app_name": args.app_name, "route_prefix": args.route_prefix,
                 "api_keys_file": args.api_keys_file, "replace_existing": True if args.replace_existing else None}
    try:
        cfg = ServeConfig.model_validate({**base, **{k: v for k, v in overrides.items() if v is not None}})
        keys = load_api_keys(cfg)  # refuse a host beyond loopback without a key before Ray starts
        checkpoint = resolve_checkpoint(cfg, run_dir or ".", None if cfg.checkpoint else needs)
        read_checkpoint_meta(checkpoint, cfg.visual_tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    take_api_keys_from_env()  # an embedded Ray's workers would inherit $SIMPLEAR_API_KEYS; `keys` holds them

    import ray
    from ray import serve

    from simplear.ray_env import init_ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        init_ray(address, namespace="simplear")
    else:  # a Ray of its own, even when another runs on this machine
        init_ray(None, num_cpus=args.num_cpus, namespace="simplear", include_dashboard=False)
    try:
        served = start(checkpoint, cfg, keys, cpus=cpus, gpus=gpus, replicas=replicas)
    except ValueError as e:  # the running Serve's proxy is beyond loopback and there is no key, or the name is taken
        print(f"error: {e}", file=sys.stderr)
        ray.shutdown()
        return 2
    print(f"serving {checkpoint} ({cfg.engine}) at {served.url}/  (API: POST {served.url}/v1/images/generations; "
          "Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(cfg.app_name)  # on a Ray of its own, shutting Ray down ends everything anyway
        ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simplear", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def workflow_args(p):
        p.add_argument("workflow", help="path to workflow.yaml")
        p.add_argument("--profile", help="profile of the workflow (default: its default_profile, else demo)")
        p.add_argument("--run-dir", help="override run_dir (e.g. a shared path on a cluster)")

    def selection_args(p):
        group = p.add_mutually_exclusive_group()
        group.add_argument("--from", dest="from_", metavar="S",
                           help="consider S and everything downstream: done ones rerun, half-done ones resume")
        group.add_argument("--only", metavar="S", help="consider S alone (its needs must be done): rerun if done, resume if half-done")
        p.add_argument("--force", metavar="S", action="append", default=[],
                       help="start S afresh whatever its state, its old outputs moved aside (repeatable)")

    def address_arg(p):
        from simplear.jobs import default_address

        p.add_argument("--address", default=default_address(),
                       help="Ray dashboard / jobs address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")

    p = sub.add_parser("run", help="run the workflow's stages that are not done")
    workflow_args(p)
    selection_args(p)
    p.add_argument("--dry-run", action="store_true", help="print what would run, start nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="table of stages: state (and why), rows kept / rejected, duration, paths to open")
    workflow_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="write <run_dir>/report.html: the run on one page (a run writes it at its end too)")
    workflow_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("clean", help="remove the outputs earlier reruns moved aside (<stage>/.previous/)")
    workflow_args(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("submit", help="submit the workflow as a Ray job")
    workflow_args(p)
    selection_args(p)
    address_arg(p)
    p.add_argument("--wait", action="store_true", help="stream the job's logs until it ends; exit with its status")
    p.add_argument("--run-dir-in-job", action="store_true",
                   help="let a relative run_dir lie in the job's working dir (lost when the job ends)")
    p.add_argument("--yes", action="store_true",
                   help="upload even a home folder, or files that may be secrets (dotfiles, keys) not excluded")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="Ray jobs of the cluster: list, logs, stop")
    p.add_argument("action", choices=["list", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    address_arg(p)
    p.set_defaults(func=cmd_jobs)

    add_checkpoint_commands(sub)

    p = sub.add_parser("dashboards", help="the project's Grafana dashboard: install it in a Grafana's provisioned folder")
    p.add_argument("action", choices=["install"])
    p.add_argument("dest", help="folder a Grafana dashboard provider reads (e.g. its provisioning/dashboards path)")
    p.set_defaults(func=cmd_dashboards)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (Ray Serve): POST /v1/images/generations and a web page")
    p.add_argument("workflow", nargs="?", help="workflow.yaml: serve its serve stage's config and checkpoint")
    p.add_argument("--profile", help="profile of the workflow")
    p.add_argument("--run-dir", help="override run_dir (where the checkpoint's stage wrote)")
    p.add_argument("--stage", help="the serve stage's name (default: the workflow's stage of kind serve)")
    p.add_argument("--model", help="checkpoint folder to serve (overrides the workflow's)")
    p.add_argument("--visual-tokenizer", help=VT_HELP)
    p.add_argument("--engine", choices=["vllm", "torch"])
    p.add_argument("--sjd-window", type=int, help="torch engine: speculative Jacobi decoding with this many drafts")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; beyond loopback an API key is required)")
    p.add_argument("--api-keys-file", help="API keys, one per line (keys also come from $SIMPLEAR_API_KEYS, comma separated)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--app-name", help="Serve application name (default simplear)")
    p.add_argument("--route-prefix", help="URL prefix of the app (default /)")
    p.add_argument("--replace-existing", action="store_true",
                   help="deploy over a running Serve app of the same name (default: refuse)")
    p.add_argument("--address", help="attach to this Ray cluster instead of starting one here (then Ctrl-C removes only this app)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from simplear.ray_env import phone_home_off
    from simplear.workflow.engine import configure_logging

    phone_home_off()  # before the libraries read their switches: huggingface_hub reads its own on import
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from simplear.workflow.lock import FencedOut, RunLocked
    from simplear.storage import StoreError
    from simplear.storage.mounts import UnsupportedRunDir

    try:
        return args.func(args)
    except (ConfigError, UnsupportedRunDir, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunLocked, FencedOut) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
