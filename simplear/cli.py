"""`simplear`: run, inspect and submit workflows (and, from the model core, generate images)."""

from __future__ import annotations

import argparse
import logging
import sys

from simplear.config import ConfigError

log = logging.getLogger("simplear")


def _load(args):
    from simplear.workflow.spec import load_workflow

    wf = load_workflow(args.workflow, args.profile)
    if getattr(args, "run_dir", None):
        wf.body.run_dir = args.run_dir
    return wf


def cmd_run(args) -> int:
    from simplear.workflow.engine import RunFailed, format_status, plan, run_workflow, select

    wf = _load(args)
    selection = select(wf, from_=args.from_, only=args.only, force=args.force)
    log.info("workflow %s, profile %s, run_dir %s", wf.path, wf.profile or "-", wf.run_dir)
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
    from simplear.workflow.engine import format_status, status_json, workflow_status

    wf = _load(args)
    statuses = workflow_status(wf)
    print(status_json(statuses) if args.json else format_status(wf, statuses))
    return 0


def cmd_submit(args) -> int:
    from simplear.jobs import submit

    wf = _load(args)  # fail here, before anything is uploaded, on a bad workflow
    job_args = ["--profile", wf.profile] if wf.profile else []
    if args.run_dir:
        job_args += ["--run-dir", args.run_dir]
    job_id = submit(args.workflow, args.address, job_args, metadata={"simplear_workflow": str(wf.path.name), "simplear_profile": wf.profile})
    print(job_id)
    print(f"dashboard: {args.address.rstrip('/')}/#/jobs/{job_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simplear", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def workflow_args(p):
        p.add_argument("workflow", help="path to workflow.yaml")
        p.add_argument("--profile", help="profile of the workflow (default: its default_profile, else demo)")
        p.add_argument("--run-dir", help="override run_dir (e.g. a shared path on a cluster)")

    p = sub.add_parser("run", help="run the workflow's stages that are not done")
    workflow_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_", metavar="S", help="rerun S and everything downstream of it")
    group.add_argument("--only", metavar="S", help="run S alone (its needs must be done)")
    p.add_argument("--force", metavar="S", action="append", default=[], help="rerun S even if it is done (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, start nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="table of stages: state, rows, duration, manifest")
    workflow_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="submit the workflow as a Ray job")
    workflow_args(p)
    p.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / jobs address")
    p.set_defaults(func=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    from simplear.workflow.engine import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
