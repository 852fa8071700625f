"""Training data order: sources mix from the first batches, each worker has its own files, resume is exact."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simplear.train_data import DataFile, Position, WorkerRows, epoch_files


def two_sources(tmp_path, parts: int = 6, rows: int = 40) -> list[DataFile]:
    """`parts` files of each of two sources, named so that path order puts all of source a first."""
    files = []
    for src in ("a", "b"):
        for p in range(parts):
            path = tmp_path / f"part-{src}-{p:03d}.parquet"
            keys = [f"{src}{p:03d}-{i:03d}" for i in range(rows)]
            pq.write_table(pa.table({"key": keys, "codes": [[i, p] for i in range(rows)]}), path, row_group_size=16)
            files.append(DataFile(str(path), rows))
    return sorted(files, key=lambda f: f.path)


def take(stream: WorkerRows, start: Position, n: int, batch_size: int) -> list[list[str]]:
    it = stream.batches(start, batch_size)
    return [list(next(it)[1]["key"]) for _ in range(n)]


def test_both_sources_appear_within_the_first_batches(tmp_path):
    files = two_sources(tmp_path)
    first = take(WorkerRows(files, ["key"], 0, 1, seed=0, shuffle_buffer=64), Position(), 4, 8)
    seen = {k[0] for batch in first for k in batch}
    assert seen == {"a", "b"}, first
    # in path order with no shuffle the first 30 batches would be source a alone
    plain = take(WorkerRows(files, ["key"], 0, 1, seed=0, shuffle_buffer=0), Position(), 4, 8)
    assert plain[0] != first[0]


def test_a_resume_gives_the_same_batches_and_rereads_at_most_the_buffer(tmp_path):
    files = two_sources(tmp_path)
    stream = WorkerRows(files, ["key", "codes"], 0, 1, seed=3, shuffle_buffer=50)
    it = stream.batches(Position(), 8)
    straight = [list(next(it)[1]["key"]) for _ in range(70)]  # beyond one epoch (480 rows = 60 batches)
    it = stream.batches(Position(), 8)
    for _ in range(25):
        next(it)
    saved = json.loads(json.dumps(stream.position().to_json()))  # through a checkpoint file
    assert len(saved["buffered"]) <= 50 and saved["batch"] == 25
    resumed = WorkerRows(files, ["key", "codes"], 0, 1, seed=3, shuffle_buffer=50)
    again = take(resumed, Position.from_json(saved), 45, 8)
    assert again == straight[25:]
    keys = [k for b in straight[:60] for k in b]
    assert len(set(keys)) == len(keys)  # no row twice in an epoch


@pytest.mark.parametrize("world", [2, 3])
def test_workers_share_every_file_of_an_epoch_once(tmp_path, world):
    files = two_sources(tmp_path)
    for epoch in (0, 1):
        shares = [epoch_files(files, epoch, 0, r, world) for r in range(world)]
        flat = [f.path for s in shares for f in s]
        assert sorted(flat) == sorted(f.path for f in files)
    assert epoch_files(files, 0, 0, 0, 2) != epoch_files(files, 1, 0, 0, 2)  # a new order each epoch
    with pytest.raises(ValueError, match="13 workers"):
        WorkerRows(files, ["key"], 0, 13, seed=0, shuffle_buffer=8)
