"""`simplear submit` and `ray job submit` against a real head node with Ray 2.60's token authentication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import start_ray_head
from simplear.jobs import job_client

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "tests/engine_workflow.yaml"


@pytest.fixture(scope="module")
def auth_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    head = start_ray_head(num_cpus=2, dashboard=True, auth=True, home=str(home))
    yield head, home / ".ray" / "auth_token"
    head.stop()


def wait_for_job(client, job_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{client.get_job_logs(job_id)}")


def test_submit_runs_the_workflow_as_a_job_with_token_auth(auth_head, tmp_path):
    head, token_path = auth_head
    assert token_path.is_file(), "ray start with token auth writes the token into HOME"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run_dir = tmp_path / "runs"

    # Without the token the jobs API refuses, with a message that says so.
    out = subprocess.run(
        [sys.executable, "-m", "simplear.cli", "submit", WORKFLOW, "--address", head.dashboard_url, "--run-dir", str(run_dir)],
        cwd=ROOT, env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")}, capture_output=True, text=True,
    )
    assert out.returncode == 2 and "Authentication required" in out.stderr and "Traceback" not in out.stderr

    out = subprocess.run(
        [sys.executable, "-m", "simplear.cli", "submit", WORKFLOW, "--address", head.dashboard_url, "--run-dir", str(run_dir)],
        cwd=ROOT, env={**env, "RAY_AUTH_TOKEN_PATH": str(token_path)}, capture_output=True, text=True, check=True,
    )
    job_id, dashboard_line = out.stdout.strip().splitlines()[-2:]
    assert dashboard_line == f"dashboard: {head.dashboard_url}/#/jobs/{job_id}"

    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    try:
        client = job_client(head.dashboard_url)
        status = wait_for_job(client, job_id)
        logs = client.get_job_logs(job_id)
        info = client.get_job_info(job_id)
    finally:
        del os.environ["RAY_AUTH_TOKEN_PATH"]
    assert status == "SUCCEEDED", logs
    assert "c: done" in logs and "ray_jobs.run_workflow" in info.entrypoint
    assert info.metadata["simplear_workflow"] == "engine_workflow.yaml"
    for stage in "abc":
        manifest = json.loads((run_dir / stage / "_MANIFEST.json").read_text())
        assert manifest["stage"] == stage and manifest["rows"] > 0

    # `ray job submit` with the same entrypoint does the same: here, it finds every stage done.
    ray_cli = str(Path(sys.executable).parent / "ray")
    out = subprocess.run(
        [ray_cli, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
         "--runtime-env", "ray_jobs/runtime_env.yaml", "--",
         "python", "-m", "ray_jobs.run_workflow", WORKFLOW, "--run-dir", str(run_dir)],
        cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)},
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in "abc":
        assert f"{stage}: up to date, skipped" in out.stdout + out.stderr


def test_submit_a_workflow_outside_the_project_waits_and_jobs_lists_it(auth_head, tmp_path):
    """The workflow's own folder (with its plugin) is the working dir, the project's packages go as py_modules;
    `--wait` streams the logs and exits with the job's status; `simplear jobs` lists, shows and stops jobs."""
    import shutil

    head, token_path = auth_head
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ROOT / "tests" / "stage_kinds.py", outside / "stage_kinds.py")
    (outside / "workflow.yaml").write_text((ROOT / WORKFLOW).read_text().replace("../runs/engine-test", "runs"))
    run_dir = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token_path), RAY_ADDRESS=head.dashboard_url)  # --address defaults to it
    # (`ray job submit` reads RAY_ADDRESS the same way)
    cli = [sys.executable, "-m", "simplear"]
    out = subprocess.run(cli + ["submit", str(outside / "workflow.yaml"), "--run-dir", str(run_dir), "--only", "a", "--wait"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"uploading {outside} as the job's working dir and the project packages simplear, pipelines, stages, ray_jobs" in out.stderr
    job_id = out.stdout.splitlines()[0]
    assert "a: run (pending)" in out.stdout and out.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert (run_dir / "a" / "_MANIFEST.json").exists() and not (run_dir / "b").exists()  # --only a reached the job

    listed = subprocess.run(cli + ["jobs", "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert any(line.startswith(job_id) and "SUCCEEDED" in line and "workflow.yaml" in line for line in listed.splitlines())
    logs = subprocess.run(cli + ["jobs", "logs", job_id], env=env, capture_output=True, text=True, check=True).stdout
    assert "a: done" in logs
    stop = subprocess.run(cli + ["jobs", "stop", job_id], env=env, capture_output=True, text=True, check=True).stdout
    assert stop.strip() == f"{job_id}: not running"
    missing = subprocess.run(cli + ["jobs", "logs", "raysubmit_nosuchjob"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


@pytest.fixture
def fake_jobs_api(monkeypatch):
    """The jobs API as `simplear submit` calls it, recording each submission instead of uploading anything."""
    from simplear import jobs

    submitted = []

    class Client:
        def submit_job(self, **kwargs):
            submitted.append(kwargs)
            return "raysubmit_fake"

    monkeypatch.setattr(jobs, "job_client", lambda address: Client())
    return submitted


def workflow_folder(folder: Path) -> Path:
    """A workflow of the tests' stage kinds in `folder` (outside the project, so the folder is the working dir)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tests" / "stage_kinds.py", folder / "stage_kinds.py")
    (folder / "workflow.yaml").write_text((ROOT / WORKFLOW).read_text().replace("../runs/engine-test", "runs"))
    return folder / "workflow.yaml"


def test_submit_refuses_secrets_it_would_upload_unless_told_yes(tmp_path, fake_jobs_api, capsys):
    from simplear.cli import main

    workflow = workflow_folder(tmp_path / "proj")
    proj = workflow.parent
    for name in [".ssh/id_rsa", ".ssh/config", ".env", "keys/server.pem", "notes/id_ed25519", "ignored.key",
                 "data/a.txt", "data/b.txt"]:
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text("x")
    (proj / ".gitignore").write_text("ignored.key\n")  # Ray leaves what .gitignore names out of the upload
    submit = ["submit", str(workflow), "--address", "http://127.0.0.1:1", "--run-dir", str(tmp_path / "runs")]

    assert main(submit) == 2
    err = capsys.readouterr().err
    assert f"error: {proj} holds files that may be secrets: " in err and "--yes" in err
    # not .gitignore, nor ignored.key, which Ray leaves out; the project's packages go along as py_modules
    assert "may be secrets: .env, .ssh/, keys/server.pem, notes/id_ed25519; the job would get " in err
    assert ".ssh/ (2), data/ (2), keys/, notes/, pipelines/ (" in err and "workflow.yaml" in err
    assert fake_jobs_api == []

    assert main(submit + ["--yes"]) == 0
    assert [s["runtime_env"]["working_dir"] for s in fake_jobs_api] == [str(proj)]
    assert capsys.readouterr().out.splitlines()[0] == "raysubmit_fake"


def test_submit_refuses_a_home_folder(tmp_path, fake_jobs_api, monkeypatch, capsys):
    from simplear.cli import main

    workflow = workflow_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(workflow.parent))
    submit = ["submit", str(workflow), "--address", "http://127.0.0.1:1", "--run-dir", str(tmp_path / "runs")]
    assert main(submit) == 2
    err = capsys.readouterr().err
    assert f"error: {workflow.parent} is your home folder or holds it: the job would get all of it " \
           "(stage_kinds.py, workflow.yaml)" in err
    monkeypatch.setenv("HOME", str(workflow.parent / "sub"))  # a folder that holds the home folder is no better
    assert main(submit) == 2
    assert fake_jobs_api == []


def test_submit_refuses_a_run_dir_the_job_would_lose_unless_told(tmp_path, fake_jobs_api, capsys):
    from simplear.cli import main

    workflow = workflow_folder(tmp_path / "proj")  # its run_dir: "runs", relative
    submit = ["submit", str(workflow), "--address", "http://127.0.0.1:1"]
    assert main(submit) == 2
    assert "run_dir 'runs' is relative: under a job it would lie in the job's working dir" in capsys.readouterr().err
    assert main(submit + ["--run-dir", "elsewhere/runs"]) == 2 and fake_jobs_api == []
    assert main(submit + ["--run-dir-in-job"]) == 0
    assert main(submit + ["--run-dir", str(tmp_path / "shared" / "runs")]) == 0
    assert fake_jobs_api[-1]["entrypoint"].endswith(f"--run-dir {tmp_path / 'shared' / 'runs'}")


def test_the_project_itself_uploads_without_a_question():
    """What the project keeps beside its code (.gitignore, .ci/ excluded, .git/ and .venv/ excluded) is no secret."""
    from simplear.jobs import plan_upload

    upload = plan_upload(ROOT / WORKFLOW)
    files = {str(f) for f in upload.files()}
    assert upload.working_dir == ROOT and upload.refusal() is None
    assert {"simplear/jobs.py", "ray_jobs/runtime_env.yaml", ".gitignore"} <= files
    assert not any(f.startswith((".git/", ".venv/", ".ci/")) for f in files)
