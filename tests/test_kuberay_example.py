"""ray_jobs/kuberay-rayjob.yaml: no Kubernetes here, so check what KubeRay would refuse or mis-run and what the
workflow needs from each pod (S3 credentials from a Secret, a node-local staging dir), with the project's own
parsers, so that a renamed flag or a stricter run-dir check breaks this test before a cluster does."""

from __future__ import annotations

import runpy
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

import simplear.cli
from simplear.storage.staging import STAGING_ENV
from simplear.workflow.spec import check_run_dir

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "ray_jobs" / "kuberay-rayjob.yaml"
ENTRY = ["python", "-m", "ray_jobs.run_workflow"]
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def cluster(job) -> dict:
    return job["spec"]["rayClusterSpec"]


def pod_specs(cluster) -> list[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g.get("groupName", "?"), g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_kind(job):
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]


def entrypoint_args(job) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:len(ENTRY)] == ENTRY
    return argv[len(ENTRY):]


def test_entrypoint_is_accepted_by_run_workflow(job, monkeypatch):
    """Through ray_jobs.run_workflow itself, so the `run` it prepends is the one tested; main is replaced by the
    parser alone, which starts nothing."""
    parsed = []

    def parse_only(argv):
        parsed.append(simplear.cli.build_parser().parse_args(argv))  # a refused flag exits 2: SystemExit below
        return 0

    monkeypatch.setattr(simplear.cli, "main", parse_only)
    monkeypatch.setattr(sys, "argv", ["run_workflow.py", *entrypoint_args(job)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("ray_jobs.run_workflow", run_name="__main__")
    assert exited.value.code == 0
    (args,) = parsed
    assert args.command == "run" and args.func is simplear.cli.cmd_run
    assert args.workflow == "workflow.yaml"
    profiles = yaml.safe_load((ROOT / args.workflow).read_text())["profiles"]  # working_dir is the project
    assert args.profile in profiles
    assert args.run_dir.startswith("s3://")
    assert check_run_dir(args.run_dir) == args.run_dir
    # A recreated RayJob must resume the run: --from / --only / --force would redo done stages every time
    assert not (args.from_ or args.only or args.force or args.dry_run)


def test_job_lifecycle(job):
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])  # KubeRay passes it on as YAML: a broken one fails at submit
    assert isinstance(runtime_env, dict)
    working_dir = runtime_env.get("working_dir")  # absent when the image holds the project
    assert working_dir is None or "://" in working_dir  # a K8sJobMode submitter has no local folder to upload


def test_ray_version_is_the_installed_one(cluster):
    assert cluster["rayVersion"] == ray.__version__


def assert_start_params(group):
    params = group["rayStartParams"]
    # The CRD types them map[string]string: a bare 0 or true is rejected by the API server
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values())


def test_head_group(cluster):
    head = cluster["headGroupSpec"]
    assert_start_params(head)
    assert head["template"]["spec"]["containers"][0]["image"]


def test_worker_groups(cluster):
    groups = cluster["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert all(names) and len(set(names)) == len(names)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert_start_params(g)
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
        gpus = [int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers]
        assert max(gpus) >= 1, g["groupName"]


def test_every_container_reads_s3_credentials_from_a_secret(cluster):
    for group, pod in pod_specs(cluster):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for name in SECRET_ENV:
                assert name in env, (group, c["name"], name)
                assert "value" not in env[name], (group, c["name"], name)  # a literal key would sit in the manifest
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], (group, c["name"], name)


def test_every_container_stages_on_a_node_local_volume(cluster):
    """The staging dir holds whole checkpoints before their upload: an emptyDir is the node's disk, with a size
    limit, where the container's writable layer would fill the disk that holds the node's images."""
    for group, pod in pod_specs(cluster):
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            path = env[STAGING_ENV]["value"]
            mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get(path.rstrip("/")) in empty_dirs, (group, c["name"], path)
