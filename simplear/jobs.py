"""`simplear submit` and `simplear jobs`: the workflow as a Ray job, with the runtime env kept in `ray_jobs/runtime_env.yaml`.

Ray 2.60 clusters use token authentication by default; the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token, as Ray itself looks for it) is sent as a bearer header when one is found.

What is uploaded: the project folder as the job's working dir when the workflow lies inside it;
otherwise the workflow's own folder as the working dir (its plugins and datasets_manifest/ with it)
and the project's packages as `py_modules`. `runtime_env.yaml`'s excludes apply to both. A job's files can be
read by whoever can reach the cluster, so `submit` refuses (short of `--yes`) to upload a home folder, or files
that may hold secrets (`Upload.refusal`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePath

import yaml

from simplear.ray_env import auth_token_path

PROJECT = Path(__file__).resolve().parent.parent
RUNTIME_ENV_FILE = PROJECT / "ray_jobs" / "runtime_env.yaml"
PACKAGES = ("simplear", "pipelines", "stages", "ray_jobs")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Names that hold credentials wherever they lie. Any other hidden name (a dotfile or dot folder: .ssh, .aws, .ray,
# .env, .netrc, shell histories ...) may too, except the ones projects keep beside their code, which hold none.
SECRET_NAMES = ("id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
                "*.keystore", "*.kdbx", "credentials", "credentials.json", "auth_token")
HARMLESS_HIDDEN = (".gitignore", ".gitattributes", ".rayignore", ".dockerignore", ".editorconfig", ".github")
SHOWN = 20  # names a refusal lists at most


def default_address() -> str:
    """As `ray job submit`: RAY_ADDRESS (the dashboard's URL) when set, else the local dashboard."""
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def find_auth_token() -> str | None:
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = auth_token_path()
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

    def files(self) -> list[PurePath]:
        """What the job would get, walked the way Ray 2.60 packs it (its own walk: the runtime env's excludes, each
        folder's .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, and .rayignore), so that what is shown is
        what goes. Paths are relative to the working dir; a py_module's start with its own name."""
        from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

        include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
        found: list[PurePath] = []
        for root in [self.working_dir, *self.py_modules]:
            walked: list[Path] = []
            _dir_travel(root, [_get_excludes(root, self.excludes)], walked.append, include_gitignore=include_gitignore)
            base = root if root == self.working_dir else root.parent
            found += [path.relative_to(base) for path in walked if path.is_file()]
        return found

    def refusal(self) -> str | None:
        """Why this upload may leak what is not the project's, with what it would upload; None when it may go."""
        home = Path.home().resolve()
        if home == self.working_dir or home.is_relative_to(self.working_dir):
            entries = sorted(p.name + "/" * p.is_dir() for p in self.working_dir.iterdir())
            return (f"{self.working_dir} is your home folder or holds it: the job would get all of it "
                    f"({_first(entries)})")
        files = self.files()
        suspects = sorted({s for f in files if (s := _suspect(f))})
        if not suspects:
            return None
        top = sorted(Counter(f.parts[0] + "/" * (len(f.parts) > 1) for f in files).items())
        return (f"{self.working_dir} holds files that may be secrets: {_first(suspects)}; the job would get "
                f"{len(files)} files: {_first([f'{name} ({n})' if n > 1 else name for name, n in top])}")


def _suspect(path: PurePath) -> str | None:
    """The part of `path` that may hold secrets (`.ssh/`, `keys/server.pem`), or None."""
    for i, part in enumerate(path.parts):
        hidden = part.startswith(".") and part not in HARMLESS_HIDDEN
        if hidden or any(fnmatch(part, pattern) for pattern in SECRET_NAMES):
            return "/".join(path.parts[:i + 1]) + "/" * (i + 1 < len(path.parts))
    return None


def _first(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


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


def submit(upload: Upload, address: str, args: list[str], metadata: dict[str, str]) -> str:
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
