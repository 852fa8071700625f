"""`simplear submit` and `simplear jobs`: the workflow as a Ray job, with the runtime env kept in `ray_jobs/runtime_env.yaml`.

Ray 2.60 clusters use token authentication by default; the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token, as Ray itself looks for it) is sent as a bearer header when one is found.

What is uploaded: the project folder as the job's working dir when the workflow lies inside it;
otherwise the workflow's own folder as the working dir (its plugins and datasets_manifest/ with it)
and the project's packages as `py_modules`. `runtime_env.yaml`'s excludes apply to both.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = PROJECT / "ray_jobs" / "runtime_env.yaml"
PACKAGES = ("simplear", "pipelines", "stages", "ray_jobs")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def default_address() -> str:
    """As `ray job submit`: RAY_ADDRESS (the dashboard's URL) when set, else the local dashboard."""
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def find_auth_token() -> str | None:
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def job_entrypoint(workflow: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", "ray_jobs.run_workflow", workflow, *args])


@dataclass
class Upload:
    working_dir: Path
    workflow: str  # the workflow's path inside the working dir
    py_modules: list[Path]

    def describe(self) -> str:
        extra = f" and the project packages {', '.join(p.name for p in self.py_modules)}" if self.py_modules else ""
        return f"uploading {self.working_dir} as the job's working dir{extra} (excluding {', '.join(self.excludes)})"

    @property
    def excludes(self) -> list[str]:
        return list((yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}).get("excludes", []))


def plan_upload(workflow: str | os.PathLike) -> Upload:
    workflow = Path(workflow).resolve()
    try:
        return Upload(PROJECT, str(workflow.relative_to(PROJECT)), [])
    except ValueError:
        return Upload(workflow.parent, workflow.name, [PROJECT / p for p in PACKAGES])


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = find_auth_token()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)


def submit(workflow: str | os.PathLike, address: str, args: list[str], metadata: dict[str, str]) -> str:
    upload = plan_upload(workflow)
    print(upload.describe(), file=sys.stderr)
    runtime_env = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}
    runtime_env["working_dir"] = str(upload.working_dir)
    if upload.py_modules:
        runtime_env["py_modules"] = [str(p) for p in upload.py_modules]
    return job_client(address).submit_job(entrypoint=job_entrypoint(upload.workflow, args), runtime_env=runtime_env,
                                          metadata=metadata)


def follow(address: str, job_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    client = job_client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return client.get_job_status(job_id).value
