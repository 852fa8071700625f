"""Resumable Parquet output for the Ray Data stages: parts written whole, a receipt per part, resume by source.

A stage reads the Parquet files an input stage recorded (its *sources*) and streams them through Ray
Data; the last step, `write_parts`, groups each block by source and writes one part per (block,
source) into each output folder (e.g. `shards/` and `rejected/`), each committed whole (manifest.committed: a
rename on a POSIX run dir, one PUT on object storage), then a receipt `_receipts/<source>/<part>.json` holding how
many input rows the part covers and each file's manifest entry (size, sha256, rows), computed by the task that
wrote it. A part is named after its smallest key, so a Ray retry of the same block rewrites the same files.
Receipts are one object per part, never per row: on object storage that is the request count that scales.

On a rerun (`resume`), a source whose receipts add up to its row count is done; the parts of any
other source, and files no receipt lists, are deleted and the source is done again. A killed run
therefore loses no key and duplicates none.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipelines.reservations import dataset_name, drop_dead_reservations
from simplear.config import StrictModel
from simplear.observability.logs import ray_data_progress
from simplear.workflow.context import StageResult
from simplear.storage import Store, join, open_parent, open_store
from simplear.workflow.manifest import commit_json, committed, file_entry
from simplear.workflow.metrics import ProgressLine, count_rows

log = logging.getLogger("simplear.stage")

RECEIPTS = "_receipts"
SRC = "_src"  # column: the source a row came from
SRC_FILE, SRC_ROW = "_src_file", "_src_row"  # columns: that source's file (relative to the run folder) and the row in it
RUN = "_run"  # column of the reader's items only: the run dir (path or URI) whose filesystem the source is on
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    id: str  # unique and file-name safe
    path: str  # on the run dir's pyarrow filesystem (Store.filesystem)
    rows: int
    ref: str = ""  # the path relative to the run folder, which rows pointing into the file record


def safe_name(text: str) -> str:
    return _SAFE.sub("_", text).strip("_") or "x"


def input_sources(ctx, folder: str | None = "shards") -> list[Source]:
    """The Parquet files every input stage recorded (under `folder` when given), with their row counts."""
    out: list[Source] = []
    for need in ctx.needs:
        for o in ctx.input_manifest(need)["outputs"]:
            rel = o["path"]
            if not rel.endswith(".parquet") or (folder is not None and not rel.startswith(folder.rstrip("/") + "/")):
                continue
            sid = safe_name(f"{need}.{rel[: -len('.parquet')]}".replace("/", "."))
            out.append(Source(id=sid, path=str(ctx.input_path(need, rel)), rows=int(o.get("rows") or 0), ref=f"{need}/{rel}"))
    return out


Receipts = dict[str, list[tuple[str, dict]]]  # by source, (receipt key, receipt) pairs


def read_receipts(store: Store, stage: str) -> Receipts:
    by_src: Receipts = {}
    for item in store.list(join(stage, RECEIPTS)):
        if not item.key.endswith(".json"):
            continue
        data = store.read_json(item.key)
        if data is None:  # damaged (a half-written file of an older release): its part is redone
            store.delete(item.key)
            continue
        by_src.setdefault(data["source"], []).append((item.key, data))
    return by_src


def resume(store: Store, stage: str, sources: list[Source], folders: list[str]) -> list[Source]:
    """Keep what finished sources wrote, delete everything else under `folders`; return the sources to (re)do.

    What is deleted is the partial output of unfinished sources (redone from their input), counted in the log."""
    receipts = read_receipts(store, stage)
    done = {s.id for s in sources if sum(d["rows"] for _, d in receipts.get(s.id, [])) == s.rows and (s.rows == 0 or s.id in receipts)}
    keep: set[str] = set()
    for sid, recs in receipts.items():
        for key, data in recs:
            if sid in done:
                keep.update(join(stage, f) for f in data["files"])
            else:
                store.delete(key)
    partial = 0
    for folder in folders:
        for item in list(store.list(join(stage, folder))):
            if item.key not in keep:
                store.delete(item.key)
                partial += 1
    todo = [s for s in sources if s.id not in done]
    if receipts or partial:
        log.info("%s: resuming: %d of %d sources done and kept; %d partial files of the others deleted, those %d sources redone",
                 stage, len(done), len(sources), partial, len(todo))
    return todo


def clean_null(v: Any) -> Any:
    """None for every flavour of missing value pandas may hand over (None, NaN, pd.NA, NaT)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if type(v).__name__ in ("NAType", "NaTType"):
        return None
    return v


def to_arrow(rows, schema: pa.Schema) -> pa.Table:
    """A pandas frame (or dict of lists) to a table of exactly `schema`: missing columns are null, NaN becomes null."""
    n = len(next(iter(rows.values()), [])) if isinstance(rows, dict) else len(rows)
    arrays = []
    for field in schema:
        if field.name in rows:
            values = [clean_null(v) for v in list(rows[field.name])]
        else:
            values = [None] * n
        if pa.types.is_integer(field.type):
            values = [None if v is None else int(v) for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


Split = Callable[[Any], dict[str, pa.Table]]  # rows of one source -> {output folder: table}


class PrepareOptions(StrictModel):
    """The CPU tasks ahead of a model stage's GPU actors: they read the rows and decode and resize the images (a
    stage on CPUs alone may skip them: see `run_stage`'s `whole_sources_on_cpu`)."""

    cpus: float = Field(0.25, gt=0, description="CPUs each task asks Ray for (small: on a 2-core machine they share "
                        "the cores the actors leave)")
    tasks: int | None = Field(None, ge=1, description="how many run at once; default twice the actor pool")


class SplitByReason:
    """Rows without a `reason` go to `shards`, the others, with their reason, to `rejected`."""

    def __init__(self, kept: pa.Schema, rejected: pa.Schema):
        self.kept, self.rejected = kept, rejected

    def __call__(self, rows) -> dict[str, pa.Table]:
        ok = rows["reason"].isna()
        return {"shards": to_arrow(rows[ok], self.kept), "rejected": to_arrow(rows[~ok], self.rejected)}


def read_sources(batch, *, columns: list[str] | None, rows_per_block: int, prepare: Callable | None = None,
                 prepare_kwargs: dict | None = None):
    """Reader task: stream each source file by record batches (a generator UDF), tagging rows with their
    source, its file and their row in it; then `prepare` each block (the CPU work ahead of a model actor).

    Used instead of `ray.data.read_parquet`, whose file-listing step asks for a whole CPU and can wait
    forever behind an actor pool on a small machine.
    """
    for path, sid, ref, run in zip(batch["path"], batch[SRC], batch[SRC_FILE], batch[RUN]):
        fs = open_store(str(run)).filesystem()[0]
        pf = pq.ParquetFile(str(path), filesystem=fs)
        offset = 0
        for rb in pf.iter_batches(batch_size=rows_per_block, columns=columns):
            table = pa.Table.from_batches([rb])
            n = table.num_rows
            table = table.append_column(SRC, pa.array([str(sid)] * n, pa.string()))
            table = table.append_column(SRC_FILE, pa.array([str(ref)] * n, pa.string()))
            table = table.append_column(SRC_ROW, pa.array(range(offset, offset + n), pa.int64()))
            offset += n
            yield table if prepare is None else prepare(table, **(prepare_kwargs or {}))


def _task_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_task_id() if ray.is_initialized() else None


def write_parts(batch, *, run: str, stage: str, split: Split, started: float | None = None) -> dict[str, list]:
    """Last step of a stage's Ray Data DAG: write this block's parts and receipts; return one summary row per part.

    A receipt names the Ray task (an actor's calls share its id) that wrote it and when that call started, so the
    work's real parallelism can be read back from the receipts."""
    store = open_store(run)
    task, started = _task_id(), started or time.time()
    summary: dict[str, list] = {"source": [], "part": [], "rows": [], "counts": []}
    for sid, rows in batch.groupby(SRC, sort=False):
        part = f"part-{sid}-{safe_name(str(min(rows['key'])))}"
        files, entries, counts = [], {}, Counter()
        for folder, table in split(rows).items():
            counts[folder] += table.num_rows
            if "reason" in table.column_names:
                for reason, n in Counter(table.column("reason").to_pylist()).items():
                    counts[f"{folder}:{reason}"] += n
            if table.num_rows == 0:
                continue
            rel = f"{folder}/{part}.parquet"
            with committed(store, join(stage, rel)) as tmp:
                pq.write_table(table, tmp)
                entries[rel] = file_entry(tmp, rel)
            files.append(rel)
        receipt = {"source": sid, "part": part, "rows": len(rows), "files": files, "entries": entries,
                   "counts": dict(counts), "task": task, "started": started, "at": time.time()}
        commit_json(store, join(stage, RECEIPTS, sid, f"{part}.json"), receipt)
        summary["source"].append(sid)
        summary["part"].append(part)
        summary["rows"].append(len(rows))
        summary["counts"].append(json.dumps(dict(counts)))
    return summary


def totals(receipts: Receipts) -> dict[str, Any]:
    """Over every receipt: input rows, rows per output folder, and rows per reason (for folders with a `reason`)."""
    rows_in = 0
    rows_out: Counter = Counter()
    reasons: Counter = Counter()
    for recs in receipts.values():
        for _, data in recs:
            rows_in += data["rows"]
            rows_out.update({k: n for k, n in data["counts"].items() if ":" not in k})
            reasons.update(by_reason(data["counts"]))
    return {"rows_in": rows_in, "rows_out": dict(sorted(rows_out.items())), "by_reason": dict(sorted(reasons.items()))}


def by_reason(counts: dict[str, int]) -> Counter:
    """A receipt's (or part summary's) `<folder>:<reason>` counts, by reason."""
    return Counter({k.split(":", 1)[1]: n for k, n in counts.items() if ":" in k})


def receipt_entries(receipts: Receipts) -> dict[str, dict]:
    """The manifest entries every receipt carries, by relative path."""
    return {rel: e for recs in receipts.values() for _, data in recs for rel, e in data.get("entries", {}).items()}


def parts_progress(location: str) -> str | None:
    """Input rows finished so far (a running or interrupted data stage), from its receipts."""
    recs = [d for rs in read_receipts(*open_parent(location)).values() for _, d in rs]
    if not recs:
        return None
    rejected = sum(d["counts"].get("rejected", 0) for d in recs)
    return f"{sum(d['rows'] for d in recs)} rows done ({rejected} rejected) in {len(recs)} parts"


def check_complete(receipts: Receipts, sources: list[Source], stage: str) -> None:
    """Every input row accounted for exactly once, or the stage fails instead of recording a wrong manifest."""
    wrong = [(s.id, sum(d["rows"] for _, d in receipts.get(s.id, [])), s.rows) for s in sources]
    wrong = [w for w in wrong if w[1] != w[2]]
    if wrong:
        details = ", ".join(f"{sid}: {got} of {want} rows" for sid, got, want in wrong[:5])
        raise RuntimeError(f"{stage}: parts do not cover their sources exactly ({details})")


class PartsWriter:
    """What a stage's actor calls last on its output: `write_parts` into the stage folder (no extra task per block)."""

    def __init__(self, run: str, stage: str, split: Split):
        self.run, self.stage, self.split = run, stage, split

    def __call__(self, out) -> dict[str, list]:
        return write_parts(as_frame(out), run=self.run, stage=self.stage, split=self.split)


def as_frame(out):
    """A stage function's or model's output (an Arrow table or a pandas frame) as the frame `write_parts` groups."""
    return out.to_pandas() if isinstance(out, pa.Table) else out


def read_process_write(batch, *, fn: Callable, fn_kwargs: dict | None = None, run: str, stage: str, split: Split,
                       columns: list[str] | None, rows_per_block: int, rows_per_part: int | None = None,
                       prepare: Callable | None = None, prepare_kwargs: dict | None = None,
                       batch_format: str = "pandas") -> dict[str, list]:
    """A source's whole work in one call: read it `rows_per_block` rows at a time, `prepare` and process each block,
    and write parts of at least `rows_per_part` processed rows (default: a part per block).

    Read, process and write are one function, not three fused map steps: Ray Data bundles a fused
    one-row read with a `batch_size=B` step into tasks of B sources, which collapses parallelism. Blocks stay
    small (what `prepare` makes, decoded pixels, lives one block at a time) while parts gather their outputs."""
    started = time.time()
    out: dict[str, list] = {"source": [], "part": [], "rows": [], "counts": []}
    pending: list = []  # processed blocks (frames) not yet written

    def flush() -> None:
        rows = pending[0] if len(pending) == 1 else pd.concat(pending, ignore_index=True)
        summary = write_parts(rows, run=run, stage=stage, split=split, started=started)
        for k in out:
            out[k] += summary[k]
        pending.clear()

    for table in read_sources(batch, columns=columns, rows_per_block=rows_per_block, prepare=prepare,
                              prepare_kwargs=prepare_kwargs):
        pending.append(as_frame(fn(table if batch_format == "pyarrow" else table.to_pandas(), **(fn_kwargs or {}))))
        if sum(map(len, pending)) >= (rows_per_part or 0):
            flush()
    if pending:
        flush()
    return out


class SourceWorker:
    """An actor that does whole sources (`read_process_write`) with a stage's function, or one instance of its
    model class (loaded once).

    On CPUs alone this is how every stage runs. For a model: reader tasks in front of model actors would share the
    same cores and ship every decoded image through the object store (0.8 MB per 512 px crop) to be encoded next
    door; here each actor decodes, encodes and writes its own sources, as a process pool would. For a function:
    one task per source waits for a worker lease and an import each time (0.1-0.2 s between sources on every
    slot), while an actor has the next source queued when one ends."""

    def __init__(self, process: Callable | type, process_kwargs: dict, **kwargs):
        if isinstance(process, type):
            self.fn, self.fn_kwargs, self.batch_format = process(**process_kwargs), None, "pyarrow"
        else:
            self.fn, self.fn_kwargs, self.batch_format = process, process_kwargs, "pandas"
        self.kwargs = kwargs

    def __call__(self, batch) -> dict[str, list]:
        return read_process_write(batch, fn=self.fn, fn_kwargs=self.fn_kwargs, batch_format=self.batch_format, **self.kwargs)


def run_stage(
    ctx,
    *,
    folders: list[str],
    split: Split,
    process: Callable | type,
    process_kwargs: dict[str, Any],
    batch_size: int,
    source_folder: str | None = "shards",
    columns: list[str] | None = None,
    rows_per_block: int = 256,
    prepare: Callable | None = None,
    prepare_kwargs: dict | None = None,
    prepare_options: PrepareOptions | None = None,
    whole_sources_on_cpu: bool = False,
) -> StageResult:
    """Stream the sources still to do through `process` and write their parts; return the stage's metrics and
    the output entries its tasks computed.

    `process` is a function (a pool of `concurrency` `SourceWorker` actors with the stage's resources, each
    reading, processing and writing whole sources, a part per `batch_size` rows) or a model class (a pool of
    `concurrency` actors with the stage's resources, GPUs included) whose constructor takes `writer=` and which
    writes its own output, so no extra task starts per block. For a model, `prepare` (pyarrow table -> table) runs
    in reader tasks on CPU: decode and resize happen there, in parallel, and the model actors get pixels ready to
    use. With `whole_sources_on_cpu`, a model stage that asks no GPUs runs `SourceWorker` actors instead, each
    doing whole sources (read, prepare, process in blocks of `rows_per_block`, write parts of `batch_size` rows):
    no pixels cross the object store.
    """
    import ray.data

    res = ctx.resources
    sources = input_sources(ctx, source_folder)
    todo = resume(ctx.store, ctx.name, sources, folders)
    rows_todo = sum(s.rows for s in todo)
    ctx.log.info("%s: %d sources, %d to do (%d rows)", ctx.name, len(sources), len(todo), rows_todo)
    t0 = time.time()
    todo = [s for s in todo if s.rows > 0]
    if todo:
        ray_data_progress(ctx.interactive)  # in logs: the progress line below instead
        items = [{"path": s.path, SRC: s.id, SRC_FILE: s.ref, RUN: ctx.store.uri} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(todo))
        model = isinstance(process, type)
        if not model or (whole_sources_on_cpu and not res.gpus):
            # a model: blocks of `rows_per_block` rows, parts of `batch_size`; a function: a part per `batch_size` rows
            blocks = {"rows_per_block": rows_per_block, "rows_per_part": batch_size} if model else {"rows_per_block": batch_size}
            ds = ds.map_batches(
                SourceWorker,
                batch_format="pyarrow",
                fn_constructor_kwargs={"process": process, "process_kwargs": process_kwargs, "run": ctx.store.uri,
                                       "stage": ctx.name, "split": split, "columns": columns, "prepare": prepare,
                                       "prepare_kwargs": prepare_kwargs, **blocks},
                # the next source waits at the actor: no dispatch gap; no more actors than sources
                **actor_options(res, 1, in_flight=2, most=len(todo)),
            )
        else:
            opts = prepare_options or PrepareOptions()
            ds = ds.map_batches(
                read_sources,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=opts.cpus,
                compute=ray.data.TaskPoolStrategy(size=min(opts.tasks or 2 * res.concurrency, len(todo))),
                fn_kwargs={"columns": columns, "rows_per_block": rows_per_block, "prepare": prepare,
                           "prepare_kwargs": prepare_kwargs},
            )
            writer = PartsWriter(ctx.store.uri, ctx.name, split)
            ds = ds.map_batches(process, batch_format="pyarrow", fn_constructor_kwargs={**process_kwargs, "writer": writer},
                                **actor_options(res, batch_size))
        ds.set_name(dataset_name(ctx.name))  # the dashboard's Ray Data page tells stages apart
        drop_dead_reservations()
        progress = ProgressLine(ctx.name, rows_todo, ctx.progress_interval_s, run=ctx.store.uri)
        for summary in ds.iter_batches(batch_size=None, batch_format="pandas"):
            done = int(summary["rows"].sum())
            rejected = sum(map(by_reason, map(json.loads, summary["counts"])), Counter())
            count_rows(ctx.name, done, rejected, ctx.store.uri)
            progress.add(done)
        progress.add(0, force=True)
        if os.environ.get("SIMPLEAR_DATA_STATS"):
            ctx.log.info("%s: Ray Data stats\n%s", ctx.name, ds.stats())
    elapsed = time.time() - t0
    receipts = read_receipts(ctx.store, ctx.name)  # once: a stage at scale has thousands
    check_complete(receipts, sources, ctx.name)
    metrics: dict[str, Any] = {"sources": len(sources), "sources_done_this_run": len(todo), "rows_this_run": rows_todo}
    metrics.update(totals(receipts))
    metrics["seconds_this_run"] = round(elapsed, 3)
    metrics["rows_per_s"] = round(rows_todo / elapsed, 2) if rows_todo and elapsed > 0 else None
    return StageResult(metrics=metrics, files=receipt_entries(receipts))


def actor_options(resources, batch_size: int, in_flight: int | None = None, most: int | None = None) -> dict[str, Any]:
    """map_batches arguments for a model stage: a pool of `concurrency` actors (at most `most`: a resumed stage
    with two sources left starts two), each with the stage's resources (and at most `in_flight` calls queued per
    actor, Ray Data's default when None)."""
    import ray.data

    size = min(resources.concurrency, most) if most else resources.concurrency
    opts: dict[str, Any] = {
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=in_flight),
        "num_cpus": resources.cpus,
    }
    if resources.gpus:
        opts["num_gpus"] = resources.gpus
    if resources.memory:
        opts["memory"] = int(resources.memory)
    return opts
