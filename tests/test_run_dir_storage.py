"""Run dirs on storage that is not a local disk: what NFS and FUSE mounts do to the lock and to readers, emulated by
patching the calls that fail there; and a cluster node that does not see the run dir, refused before any work."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from simplear.workflow import lock as lock_module
from simplear.workflow.lock import FENCE_ENV, LOCK, FencedOut, LockSettings, RunLock, check_fence
from simplear.workflow.manifest import read_json
from simplear.storage import mounts as storage_module
from simplear.storage.mounts import UnsupportedRunDir, mount_of


def test_a_file_system_without_hard_links_is_named_not_a_raw_oserror(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(UnsupportedRunDir, match=r"makes no hard links .*POSIX shared file system"):
        RunLock.acquire(tmp_path / "runs", LockSettings())
    assert not list((tmp_path / "runs").iterdir())  # the temp file is gone too


def test_an_nfs_link_that_answers_eexist_after_succeeding_still_takes_the_lock(tmp_path, monkeypatch):
    real_link = os.link

    def retransmitted(src, dst):
        real_link(src, dst)  # the first try went through; its answer was lost and the retry saw the file
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "link", retransmitted)
    lock = RunLock.acquire(tmp_path / "runs", LockSettings())
    try:
        assert lock.holds()
    finally:
        lock.release()
    # a lock someone else holds still refuses: the link count of our temp file stays 1
    (tmp_path / "runs" / LOCK).write_text(json.dumps({"run_id": "other", "host": socket.gethostname(), "pid": os.getpid()}))
    monkeypatch.setattr(os, "link", real_link)
    with pytest.raises(lock_module.RunLocked):
        RunLock.acquire(tmp_path / "runs", LockSettings())


def test_a_fuse_mount_of_object_storage_is_refused_naming_the_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_module, "mount_of", lambda path: ("/mnt/bucket", "fuse.gcsfuse"))
    with pytest.raises(UnsupportedRunDir, match=r"fuse.gcsfuse, mounted on /mnt/bucket.*FUSE mount of object"):
        RunLock.acquire(tmp_path / "runs", LockSettings())
    assert not (tmp_path / "runs" / LOCK).exists()


def test_mount_of_names_the_innermost_mount():
    assert mount_of("/proc/self") == ("/proc", "proc")
    assert mount_of("/")[0] == "/"


def test_a_reader_retries_estale(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    calls = []
    real = Path.read_bytes

    def stale_once(self, *a, **k):
        calls.append(self)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_bytes", stale_once)
    assert read_json(path) == {"a": 1} and len(calls) == 2
    monkeypatch.setattr(Path, "read_bytes", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.ESTALE, "x")))
    with pytest.raises(OSError):
        read_json(path)


def test_a_task_on_a_node_without_the_run_dir_is_told_so(tmp_path, monkeypatch):
    monkeypatch.setenv(FENCE_ENV, json.dumps({"run": str(tmp_path / "not-here"), "run_id": "r"}))
    with pytest.raises(FencedOut, match="not visible on this node"):
        check_fence()


def test_a_node_that_does_not_see_the_run_dir_is_refused_before_any_work(tmp_path):
    """A two-node cluster on this machine whose worker node runs in a mount namespace with an empty tmpfs over the
    run dir's parent: the run dir is node-local to the head. The run must fail before any stage, naming the node."""
    from conftest import RAY, start_ray_head, free_port
    from test_engine import make_workflow

    hidden = tmp_path / "shared"
    hidden.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {hidden}"], capture_output=True)
    assert probe.returncode == 0, f"this test needs mount namespaces (root): {probe.stderr.decode()[-200:]}"
    head = start_ray_head(num_cpus=1)
    try:
        start = [RAY, "start", f"--address={head.address}", "--num-cpus=1", f"--temp-dir={head.temp_dir}",
                 "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}"]
        script = f"mount -t tmpfs none {hidden} && exec " + " ".join(start)
        out = subprocess.run(["unshare", "-m", "sh", "-c", script], env=head.env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        path = make_workflow(hidden, a={"shards": 2})
        env = {**head.env, "RAY_ADDRESS": head.address, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), head.env.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-m", "simplear", "run", str(path)], env=env, capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert run.returncode != 0
        assert "is not visible on 1 of 2 nodes" in run.stderr and "does not exist on this node" in run.stderr
        assert not any((hidden / "runs").glob("*/_MANIFEST.json")) and not (hidden / "runs" / "a").exists()
    finally:
        head.stop()


@pytest.mark.parametrize("uri", ["gs://b/r", "abfs://c@acct.dfs.core.windows.net/r", "s3://bucket/r?endpoint_override=x"])
def test_a_run_dir_uri_that_is_not_supported_is_refused_not_made_a_local_folder(tmp_path, uri, capsys):
    import yaml

    from simplear.cli import main
    from simplear.config import ConfigError
    from simplear.workflow.spec import load_workflow

    path = tmp_path / "workflow.yaml"
    body = {"plugins": ["stage_kinds"], "stages": {"a": {"uses": "test_shards"}}}
    path.write_text(yaml.safe_dump({"run_dir": uri, **body}))
    with pytest.raises(ConfigError, match=r"is not a supported run dir|not in the URI"):
        load_workflow(path)
    path.write_text(yaml.safe_dump({"run_dir": "runs", **body}))
    assert main(["run", str(path), "--run-dir", uri, "--dry-run"]) == 2
    assert "--run-dir: run_dir" in capsys.readouterr().err
    assert not list(tmp_path.glob("*:")) and not (Path.cwd() / uri.split("/")[0]).exists()
