"""The storage under a run dir: one contract on a POSIX folder and on S3 (a real S3 server on loopback), and the
lock protocol on it, with a race among takers proven on a store that serialises each check-and-write."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from simplear.storage import Blob, Listed, Store, open_store
from simplear.storage.local import LocalStore
from simplear.workflow.lock import FENCE_ENV, LOCK, FencedOut, LockSettings, RunLock, RunLocked
from simplear.workflow.manifest import committed, describe_outputs


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "run")
    server = request.getfixturevalue("s3_server")
    return open_store(server.bucket(f"contract-{os.urandom(4).hex()}") + "/runs/x")


def test_whole_objects_and_conditional_writes(store):
    assert store.read("a/b.json") is None and not store.exists("a/b.json")
    v1 = store.create("a/b.json", b"one")
    assert v1 and store.read("a/b.json") == Blob(b"one", v1) and store.exists("a/b.json")
    assert store.create("a/b.json", b"two") is None  # create-only: the first writer keeps it
    assert store.read("a/b.json").data == b"one"
    v2 = store.swap("a/b.json", b"two", v1)
    assert v2 and v2 != v1 and store.read("a/b.json").data == b"two"
    assert store.swap("a/b.json", b"three", v1) is None  # a stale version loses
    assert store.swap("missing.json", b"x", v1) is None
    assert not store.delete("a/b.json", version=v1) and store.exists("a/b.json")
    assert store.delete("a/b.json", version=v2) and not store.exists("a/b.json")
    assert not store.delete("a/b.json")


def test_listing_moving_and_files(store, tmp_path):
    for key in ("s/x/1.txt", "s/x/2.txt", "s/xy.txt", "t/1.txt"):
        store.write(key, key.encode())
    assert [i.key for i in store.list("s/x")] == ["s/x/1.txt", "s/x/2.txt"]  # a folder's worth, not `s/xy.txt`
    assert [i.key for i in store.list("s/xy.txt")] == ["s/xy.txt"]
    assert [i.key for i in store.list("")] == ["s/x/1.txt", "s/x/2.txt", "s/xy.txt", "t/1.txt"]
    store.move("s/x", "s/.previous/old/x")
    assert [i.key for i in store.list("s")] == ["s/.previous/old/x/1.txt", "s/.previous/old/x/2.txt", "s/xy.txt"]
    assert store.delete_prefix("s/.previous") == 2 * len("s/x/1.txt")
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(9 << 20))  # above boto3's multipart threshold
    store.upload(local, "t/big.bin")
    back = tmp_path / "back.bin"
    store.download("t/big.bin", back)
    assert back.read_bytes() == local.read_bytes()
    assert Listed("t/big.bin", 9 << 20) in list(store.list("t"))
    with pytest.raises(FileNotFoundError):
        store.download("t/none", tmp_path / "none")


def test_a_folder_commits_whole_and_replaces_the_old_one(store):
    with committed(store, "stage/final") as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"bb")
    with committed(store, "stage/final") as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"A")
    assert [(i.key, i.size) for i in store.list("stage/final")] == [("stage/final/a.bin", 1)]
    with pytest.raises(RuntimeError):
        with committed(store, "stage/never.txt") as tmp:
            tmp.write_text("x")
            raise RuntimeError("the writer failed")
    assert not store.exists("stage/never.txt")
    assert [o["path"] for o in describe_outputs(store, "stage")] == ["final/a.bin"]


class SerialStore(Store):
    """In memory; every operation under one mutex, so a check-and-write is atomic as S3 promises (moto checks then
    writes without a lock: it shows the semantics, not race safety). A short pause inside each conditional write
    widens the window in which takers overlap."""

    def __init__(self) -> None:
        self.uri, self.objects, self.mutex, self.n = "memory://race", {}, threading.Lock(), 0

    def _version(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def check(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"

    def read(self, key: str) -> Blob | None:
        with self.mutex:
            return self.objects.get(key)

    def write(self, key: str, data: bytes) -> str:
        with self.mutex:
            self.objects[key] = Blob(data, self._version())
            return self.objects[key].version

    def create(self, key: str, data: bytes) -> str | None:
        with self.mutex:
            time.sleep(0.001)
            if key in self.objects:
                return None
            self.objects[key] = Blob(data, self._version())
            return self.objects[key].version

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        with self.mutex:
            time.sleep(0.001)
            if key not in self.objects or self.objects[key].version != version:
                return None
            self.objects[key] = Blob(data, self._version())
            return self.objects[key].version

    def delete(self, key: str, version: str | None = None) -> bool:
        with self.mutex:
            if key not in self.objects or (version and self.objects[key].version != version):
                return False
            del self.objects[key]
            return True

    def exists(self, key: str) -> bool:
        return self.read(key) is not None

    def list(self, prefix: str = "") -> Iterator[Listed]:
        with self.mutex:
            return iter([Listed(k, len(b.data)) for k, b in sorted(self.objects.items()) if k.startswith(prefix)])

    def filesystem(self):
        raise NotImplementedError

    def upload(self, local: Path, key: str) -> None:
        self.write(key, local.read_bytes())

    def download(self, key: str, local: Path) -> None:
        local.write_bytes(self.read(key).data)

    def move(self, src: str, dst: str) -> None:
        raise NotImplementedError


def test_concurrent_takers_of_a_dead_lock_have_one_winner():
    """Twelve takers see the same dead holder (its lock unchanged for stale_after_s, by their own clocks) and race
    to swap it: one wins; each other one is refused, having seen the winner's process alive or the lock change
    while it watched."""
    store = SerialStore()
    store.write(LOCK, json.dumps({"run_id": "dead", "host": "elsewhere", "pid": 1, "heartbeat": 1e12}).encode())
    start, results = threading.Barrier(12), []

    def take() -> None:
        start.wait()
        try:
            results.append(RunLock.acquire(store, LockSettings(stale_after_s=0.5, heartbeat_s=60)))
        except RunLocked as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results if isinstance(r, RunLock)]
    assert len(results) == 12 and len(winners) == 1, results
    losers = [str(r) for r in results if isinstance(r, RunLocked)]
    assert all("its process is running" in m or "its lock changed" in m for m in losers), losers
    assert json.loads(store.read(LOCK).data)["run_id"] == winners[0].run_id
    winners[0].release()
    assert store.read(LOCK) is None


def test_a_holder_that_lost_its_lock_stops_and_commits_nothing(s3_server, monkeypatch):
    """On S3: a taker swaps the lock of a holder it judged dead; the holder's next heartbeat fails (FencedOut), and
    a commit of one of its tasks writes nothing, so no manifest of the new run can name it."""
    store = open_store(s3_server.bucket("fenced") + "/run")
    lock = RunLock.acquire(store, LockSettings(heartbeat_s=60))
    monkeypatch.setenv(FENCE_ENV, lock.fence_token)
    with committed(store, "a/part-0.parquet") as tmp:
        tmp.write_bytes(b"held")
    blob = store.read(LOCK)
    taker = {"run_id": "taker", "host": socket.gethostname(), "pid": os.getpid()}
    assert store.swap(LOCK, json.dumps(taker).encode(), blob.version)
    with pytest.raises(FencedOut, match="lost the lock"):
        with committed(store, "a/part-1.parquet") as tmp:
            tmp.write_bytes(b"too late")
    with pytest.raises(FencedOut, match="lost the lock"):
        lock.update()
    lock.release()  # not ours any more: the taker's lock stays
    assert [i.key for i in store.list("a")] == ["a/part-0.parquet"]
    assert store.read_json(LOCK)["run_id"] == "taker"


def test_a_lock_released_while_a_taker_watches_it_is_taken_at_once():
    store = SerialStore()
    store.write(LOCK, json.dumps({"run_id": "far", "host": "elsewhere", "pid": 1}).encode())
    threading.Timer(0.3, lambda: store.delete(LOCK)).start()
    t0 = time.monotonic()
    lock = RunLock.acquire(store, LockSettings(stale_after_s=30, heartbeat_s=60))
    assert time.monotonic() - t0 < 5 and json.loads(store.read(LOCK).data)["run_id"] == lock.run_id
    lock.release()


def test_status_reads_a_training_stage_s_progress_from_the_end_of_its_log_on_every_backend(store):
    from simplear.t2i import train_progress

    stage = store.child("pretrain")
    assert train_progress(stage) is None  # nothing logged yet
    rows = [{"step": s, "loss": 10.0 / s, "note": "x" * 200} for s in range(1, 101)]  # more than the 8 KiB read
    store.write("pretrain/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert train_progress(stage) == "step 100, loss 0.1"
