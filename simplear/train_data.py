"""Each training worker's rows: files shuffled per epoch, a fixed share per rank, a seeded shuffle buffer,
and a resume position that re-reads at most the buffer.

Why not Ray Data's `streaming_split`: it hands blocks to workers dynamically (so a resume with several
workers cannot be exact), it reads the files in manifest order (sorted by path, so by source: 100k
steps would see the sources one after another), and a resume could only skip by reading again
everything already consumed. Here, for epoch `e`, the files are permuted with `(seed, e)` and worker
`r` of `w` reads files `r::w` of that order, row group by row group, through a buffer of
`shuffle_buffer` rows from which each micro-batch is drawn at random (`(seed, e, r)`). Row counts
come from the manifests, never from scanning the files.

`Position` is where a worker stands after a micro-batch: epoch, the file and row its reading has
reached, the rows still in the buffer (as (file, row) pairs) and the draw generator's state. A resume
reads those buffered rows back (at most `shuffle_buffer`) and goes on from the cursor, giving the same
micro-batches as a run that was never stopped. Each worker's epochs run on their own (its share of
rows may differ from another's by a file), so no worker waits for another at an epoch's end.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

log = logging.getLogger("simplear.train")


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of training data. `run`: the run dir (path or URI) whose filesystem `path` is on, so a worker
    on any node reads it where it lies (object storage included); None: a local path."""

    path: str
    rows: int
    run: str | None = None

    def parquet(self):
        import pyarrow.parquet as pq

        from simplear.storage import open_store

        return pq.ParquetFile(self.path, filesystem=open_store(self.run).filesystem()[0] if self.run else None)


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # micro-batches drawn in this epoch
    file: int = 0  # index into this worker's files of the epoch: the next to read
    row: int = 0  # rows of that file already read
    buffered: list[list[int]] = field(default_factory=list)  # [file index, row] of the rows in the buffer
    rng: dict | None = None  # the draw generator's state (None: fresh for the epoch)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "Position":
        data = dict(data or {})
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def epoch_files(files: list[DataFile], epoch: int, seed: int, rank: int, world: int) -> list[DataFile]:
    """This worker's files for `epoch`: a permutation of all files by (seed, epoch), every `world`-th from `rank`."""
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    return [files[i] for i in order[rank::world]]


class WorkerRows:
    """Endless micro-batches of one worker, resumable from a `Position`."""

    def __init__(self, files: list[DataFile], columns: list[str], rank: int, world: int, seed: int, shuffle_buffer: int):
        if len(files) < world:
            raise ValueError(f"{len(files)} data files for {world} workers: every worker reads whole files, so it needs "
                             "at least one (write more, smaller parts, or use fewer workers)")
        self.files, self.columns = files, columns
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer = shuffle_buffer
        self._state = Position

    def _read(self, f: DataFile, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row, values) from row `start` of a file on, read by row group."""
        pf = f.parquet()
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > start:
                t = pf.read_row_group(g, columns=self.columns)
                cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in self.columns}
                for i in range(max(0, start - first), n):
                    yield first + i, {c: cols[c][i] for c in self.columns}
            first += n

    def _rows_at(self, mine: list[DataFile], where: list[list[int]]) -> list[dict[str, Any]]:
        """The rows at (file index, row) pairs, in that order: what a resume puts back in the buffer."""
        by_file: dict[int, list[int]] = defaultdict(list)
        for fi, row in where:
            by_file[fi].append(row)
        got: dict[tuple[int, int], dict] = {}
        for fi, rows in by_file.items():
            t = mine[fi].parquet().read(columns=self.columns).take(sorted(rows))
            cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in self.columns}
            for j, row in enumerate(sorted(rows)):
                got[(fi, row)] = {c: cols[c][j] for c in self.columns}
        return [got[(fi, row)] for fi, row in where]

    def position(self) -> Position:
        """Where this worker stands after the last micro-batch it handed out (what a checkpoint keeps)."""
        return self._state()

    def batches(self, start: Position, batch_size: int) -> Iterator[tuple[Position, dict[str, np.ndarray]]]:
        """(epoch and batch after it, rows as column arrays) for every micro-batch from `start` on, epoch after
        epoch; `position()` gives the whole state after the last one."""
        pos = Position.from_json(asdict(start))
        while True:
            got = 0
            for light, rows in self._epoch(pos, batch_size):
                got += 1
                yield light, rows
            if got == 0 and pos.batch == 0:
                raise ValueError(f"worker {self.rank}: its files hold no full micro-batch of {batch_size} rows")
            pos = Position(epoch=pos.epoch + 1)

    def _epoch(self, pos: Position, batch_size: int) -> Iterator[tuple[Position, dict[str, np.ndarray]]]:
        mine = epoch_files(self.files, pos.epoch, self.seed, self.rank, self.world)
        rng = np.random.default_rng([self.seed, pos.epoch, self.rank])
        if pos.rng is not None:
            rng.bit_generator.state = pos.rng
        ids = [list(x) for x in pos.buffered]
        buf = self._rows_at(mine, ids) if ids else []
        capacity = max(self.shuffle_buffer, batch_size)
        fi, row, batch = pos.file, pos.row, pos.batch
        reader = self._read(mine[fi], row) if fi < len(mine) else iter(())

        def fill() -> None:
            nonlocal fi, row, reader
            while len(buf) < capacity and fi < len(mine):
                nxt = next(reader, None)
                if nxt is None:
                    fi, row = fi + 1, 0
                    reader = self._read(mine[fi], 0) if fi < len(mine) else iter(())
                    continue
                r, values = nxt
                buf.append(values)
                ids.append([fi, r])
                row = r + 1

        while True:
            fill()
            if len(buf) < batch_size:
                if buf:  # not the same rows each epoch: files and buffer are reshuffled
                    log.info("worker %d: the last %d rows of epoch %d are fewer than a micro-batch of %d and left out of it",
                             self.rank, len(buf), pos.epoch, batch_size)
                return
            if self.shuffle_buffer:
                take = sorted(rng.choice(len(buf), size=batch_size, replace=False).tolist(), reverse=True)
            else:
                take = list(range(batch_size - 1, -1, -1))
            chosen = []
            for i in take:  # swap-remove: O(1) each, the buffer's order stays a function of the draws
                buf[i], buf[-1] = buf[-1], buf[i]
                ids[i], ids[-1] = ids[-1], ids[i]
                chosen.append(buf.pop())
                ids.pop()
            chosen.reverse()
            batch += 1
            rows = {c: np.array([r[c] for r in chosen], dtype=object) for c in self.columns}
            self._state = lambda: Position(pos.epoch, batch, fi, row, [list(x) for x in ids], rng.bit_generator.state)
            yield Position(pos.epoch, batch), rows
