"""`simplear submit`: the workflow as a Ray job, with the runtime env kept in `ray_jobs/runtime_env.yaml`.

Ray 2.60 clusters use token authentication by default; the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token, as Ray itself looks for it) is sent as a bearer header when one is found.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml

RUNTIME_ENV_FILE = Path(__file__).resolve().parent.parent / "ray_jobs" / "runtime_env.yaml"


def find_auth_token() -> str | None:
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def job_entrypoint(workflow: str, args: list[str]) -> str:
    return shlex.join(["python", "-m", "ray_jobs.run_workflow", workflow, *args])


def submit(workflow: str | os.PathLike, address: str, args: list[str], metadata: dict[str, str]) -> str:
    from ray.job_submission import JobSubmissionClient

    workflow = Path(workflow).resolve()
    project = RUNTIME_ENV_FILE.parent.parent
    try:
        rel = workflow.relative_to(project)
    except ValueError:
        raise ValueError(f"{workflow}: the workflow must lie inside the project folder {project} to be uploaded") from None
    runtime_env = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}
    runtime_env["working_dir"] = str(project)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(address, headers=headers)
    return client.submit_job(entrypoint=job_entrypoint(str(rel), args), runtime_env=runtime_env, metadata=metadata)


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = find_auth_token()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
