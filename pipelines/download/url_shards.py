"""URL lists (CC3M, CC12M, Megalith-10M, OpenImages, the demo set), downloaded shard by shard in our own Ray tasks.

img2dataset's `ray` distributor ignores `processes_count` and `max_shard_retry`, submits every shard at
once and drops a failed shard's status: a shard could go missing while the stage recorded itself done.
So the stage plans the shards itself, once (`_shards_in/NNNNN.arrow`, img2dataset's shard format, and
`_PLAN.json`), and runs img2dataset's own per-shard `Downloader` in one Ray task per shard, at most
`resources.concurrency` at a time; a failed shard is retried `max_shard_retry` times, then the stage
fails naming it. The plan is kept in the stage folder (a later run reuses it, so the keys stay); img2dataset
works in node-local scratch (`staging_dir`), which the run dir need not be. A shard is done when
`shards/NNNNN.parquet` exists, committed whole, with exactly one row per planned input row:
- the list is read as bytes: a caption that is not valid UTF-8 is kept, decoded with replacement and
  flagged in `extra`; a URL that is not, or a malformed line, becomes a failed row with its reason;
- a row img2dataset drops on an exception of its own comes back as a failed row (`img2dataset_error`);
- URLs are fetched by `fetch.py`'s guarded fetch in place of img2dataset's (http(s) only, no internal
  address unless the manifest opts in, bodies capped at `max_image_bytes`), each refusal a failed row;
- images are put upright (EXIF orientation) before img2dataset resizes or re-encodes them, and no
  decoder sees more than `max_decode_pixels` (read from the header first; cv2's own limit is set too);
  a list that says how its images are turned (`rotation_col`, Open Images' Rotation) has them turned after.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.download.fetch import FetchPolicy, guarded
from pipelines.download.images import rotate, rotation_degrees, upright
from pipelines.download.schema import IMAGE_ROW_GROUP, SCHEMA, SHARDS, classify, shard_keys
from simplear.storage import Store, join, open_store
from simplear.workflow.manifest import commit_json, committed, record_entry, staging_dir

log = logging.getLogger("simplear.stage.download")

PLAN_DIR = "_shards_in"
PLAN = "_PLAN.json"
WORK = "_img2dataset"  # where releases before object storage kept their shard attempts, in the stage folder
FLAGS = "_flags"  # shard-input column: JSON of what reading the list found wrong with the row


# -- reading a list ------------------------------------------------------------------------------------


def _decode(value: bytes | str | None) -> tuple[str | None, bool]:
    """(text, was valid UTF-8)."""
    if value is None or isinstance(value, str):
        return value, True
    try:
        return value.decode("utf-8"), True
    except UnicodeDecodeError:
        return value.decode("utf-8", errors="replace"), False


def read_list(path: str, input_format: str, columns: list[str], column_names: list[str] | None,
              malformed: list[str]) -> Iterator[dict[str, list]]:
    """The list's `columns` in batches of raw values (bytes for csv/tsv, so one bad byte spoils no column);
    lines that cannot be parsed are appended to `malformed`."""
    base = input_format.removesuffix(".gz")
    compression = "gzip" if input_format.endswith(".gz") else None
    if base == "parquet":
        for rb in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=columns):
            yield rb.to_pydict()
    elif base in ("csv", "tsv"):
        import pyarrow.csv as pacsv

        def bad_line(row) -> str:
            malformed.append(row.text)
            return "skip"

        reader = pacsv.open_csv(
            pa.input_stream(path, compression=compression),
            read_options=pacsv.ReadOptions(column_names=column_names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\t" if base == "tsv" else ",", quote_char=False if base == "tsv" else '"',
                                             invalid_row_handler=bad_line),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns}),
        )
        for rb in reader:
            yield rb.to_pydict()
    elif base == "txt":
        with pa.input_stream(path, compression=compression) as f:
            urls = [line.rstrip(b"\r\n") for line in f.read().split(b"\n") if line.strip()]
        yield {columns[0]: urls}
    else:  # json / jsonl
        with pa.input_stream(path, compression=compression) as f:
            raw = f.read()
        records = []
        if base == "json":  # one document: a list of records, each judged on its own
            for i, item in enumerate(json.loads(raw)):
                try:
                    records.append(_json_record(item, columns))
                except (ValueError, RecursionError) as e:
                    malformed.append(f"record {i} of the JSON list: {e}")
        else:
            for line in raw.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    records.append(_json_record(json.loads(line), columns))
                except (ValueError, RecursionError, MemoryError):  # a hostile line (deep nesting, a huge number) too
                    malformed.append(line.decode("utf-8", errors="replace"))
        yield {c: [r[c] for r in records] for c in columns}


def _json_record(record, columns: list[str]) -> dict:
    """A JSON list's record as text by column (a number or a nested value as its JSON text), None where absent;
    a record that is not an object raises ValueError (a malformed line)."""
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    return {c: v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for c in columns for v in [record.get(c)]}


def plan_shards(stage: str | os.PathLike, files: list[str], input_format: str, url_col: str, caption_col: str | None,
                extra_cols: list[str], column_names: list[str] | None, per_shard: int, folder: Path | None = None) -> dict:
    """Split the list(s) into shard inputs, once; a rerun reuses the plan (and so the keys).

    `stage`: the stage folder, a path or URI (tasks open it as a store of their own). `files` relative to `folder`
    are recorded by those names: a generated set is drawn again in a new folder each run on object storage."""
    store = open_store(stage)
    plan = store.read_json(join(PLAN_DIR, PLAN))
    if plan is not None:
        changed = [f"{f} ({n} -> {os.path.getsize(p) if os.path.exists(p) else 'gone'} bytes)"
                   for f, n in plan.get("lists", {}).items() for p in [_located(f, folder)]
                   if not os.path.exists(p) or os.path.getsize(p) != n]
        if changed:  # a touched list is fine; one whose bytes changed would shift the planned keys
            raise RuntimeError(f"the URL list changed since it was planned: {', '.join(changed)}; restore it, or "
                               "`--force` the stage to plan and download it afresh (the old outputs are moved aside)")
        return plan
    store.delete_prefix(PLAN_DIR)  # a plan cut short by a kill: start it again
    columns = [url_col] + ([caption_col] if caption_col else []) + list(extra_cols)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())] + [(c, pa.string()) for c in extra_cols]
                       + [(FLAGS, pa.string())])
    rows_per_shard: list[int] = []
    pending: dict[str, list] = {name: [] for name in schema.names}
    counts: Counter = Counter()

    def flush(force: bool = False) -> None:
        while len(pending["url"]) >= per_shard or (force and pending["url"]):
            take = {k: v[:per_shard] for k, v in pending.items()}
            for k in pending:
                del pending[k][:per_shard]
            sid = len(rows_per_shard)
            with committed(store, join(PLAN_DIR, f"{sid:05d}.arrow")) as tmp, pa.OSFile(str(tmp), "wb") as sink:
                with pa.ipc.new_file(sink, schema) as writer:
                    writer.write_table(pa.table(take, schema=schema))
            rows_per_shard.append(len(take["url"]))

    def add(url, caption, extras: list, flags: dict) -> None:
        pending["url"].append(url)
        pending["caption"].append(caption)
        for c, v in zip(extra_cols, extras):
            pending[c].append(None if v is None else str(_decode(v)[0]))
        pending[FLAGS].append(json.dumps(flags) if flags else None)

    for path in files:
        malformed: list[str] = []
        for batch in read_list(_located(path, folder), input_format, columns, column_names, malformed):
            urls = batch[url_col]
            captions = batch[caption_col] if caption_col else [None] * len(urls)
            for i, (url, caption) in enumerate(zip(urls, captions)):
                flags: dict = {}
                url, url_ok = _decode(url)
                caption, caption_ok = _decode(caption)
                if not url_ok:
                    flags["invalid_utf8_url"] = True
                    counts["invalid_utf8_url"] += 1
                if not caption_ok:
                    flags["caption_invalid_utf8"] = True
                    counts["caption_invalid_utf8"] += 1
                add("" if not url_ok else (url or ""), caption, [batch[c][i] for c in extra_cols], flags)
            flush()
        for text in malformed:  # every line of the list ends as a row, an unparsable one as a failed row
            counts["malformed_line"] += 1
            add("", None, [None] * len(extra_cols), {"malformed_line": text[:500]})
        flush()
    flush(force=True)
    plan = {"shards": len(rows_per_shard), "rows": rows_per_shard, "input_rows": sum(rows_per_shard),
            "lists": {f: os.path.getsize(_located(f, folder)) for f in files},
            "read_problems": dict(counts), "per_shard": per_shard}
    commit_json(store, join(PLAN_DIR, PLAN), plan)
    log.info("planned %d shards of up to %d rows from %d list file(s): %s", plan["shards"], per_shard, len(files), dict(counts))
    return plan


def _located(name: str, folder: Path | None) -> str:
    return os.path.join(folder, name) if folder else name


# -- one shard, in its own Ray task ------------------------------------------------------------------


def _upright_resizer(settings: dict):
    """img2dataset's Resizer, after the orientation and size checks it lacks."""
    from img2dataset.resizer import Resizer
    from PIL import Image

    class UprightResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data, error = upright(img_stream.read(), settings["max_decode_pixels"])
            if error:
                return None, None, None, None, None, error
            return super().__call__(io.BytesIO(data), blurring_bbox_list)  # re-encoded as configured, if at all

    Image.MAX_IMAGE_PIXELS = settings["max_decode_pixels"]
    return UprightResizer(
        image_size=settings["image_size"], resize_mode=settings["resize_mode"],
        resize_only_if_bigger=settings["resize_only_if_bigger"], encode_quality=settings["encode_quality"],
        encode_format=settings["encode_format"], skip_reencode=settings["skip_reencode"],
        min_image_size=settings["min_image_size"], max_image_area=settings["max_image_area"] or float("inf"),
        max_aspect_ratio=settings["max_aspect_ratio"] or float("inf"),
    )


def download_shard(shard_id: int, stage: str, settings: dict, dataset: str, extra_cols: list[str], oom_shard_count: int) -> dict:
    """Download one planned shard with img2dataset's Downloader in node-local scratch and commit
    `shards/NNNNN.parquet` whole into the stage folder `stage` (a path or URI)."""
    from img2dataset.downloader import Downloader, compute_key
    from img2dataset.writer import ParquetSampleWriter

    store = open_store(stage)
    work = Path(tempfile.mkdtemp(prefix=f"{shard_id:05d}-", dir=staging_dir()))
    try:
        store.download(join(PLAN_DIR, f"{shard_id:05d}.arrow"), work / "planned.arrow")
        planned = pa.ipc.open_file(pa.memory_map(str(work / "planned.arrow"))).read_all()
        if settings.get("url_prefix"):  # a set served for this run only: its plan holds paths, the server's port changes
            urls = [settings["url_prefix"] + u if u else u for u in planned.column("url").to_pylist()]
            planned = planned.set_column(planned.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
        # the Downloader deletes its input: it gets a copy, a retry reads the plan again
        with pa.OSFile(str(work / "input.arrow"), "wb") as sink, pa.ipc.new_file(sink, planned.schema) as writer:
            writer.write_table(planned)
        downloader = Downloader(
            ParquetSampleWriter, _upright_resizer(settings), settings["thread_count"], True, False, str(work),
            ["url", "caption", *extra_cols, FLAGS], settings["timeout"], settings["number_sample_per_shard"], oom_shard_count,
            "sha256", None, settings["encode_format"], settings["retries"], settings["user_agent_token"],
            settings["disallowed_header_directives"],
        )
        with guarded(FetchPolicy(settings["allow_private_addresses"], settings["max_image_bytes"])):
            ok, _ = downloader((shard_id, str(work / "input.arrow")))
        raw = work / f"{shard_id:0{oom_shard_count}d}.parquet"
        if not ok or not raw.exists():
            raise RuntimeError(f"img2dataset failed on shard {shard_id:05d} (see the task's log)")
        got = pq.read_table(raw)
        oom_sample = math.ceil(math.log10(settings["number_sample_per_shard"]))
        keys = [compute_key(i, shard_id, oom_sample, oom_shard_count) for i in range(planned.num_rows)]
        table = _convert(got, planned, keys, dataset, settings, extra_cols)
        if table.num_rows != planned.num_rows:
            raise RuntimeError(f"shard {shard_id:05d}: {table.num_rows} rows for {planned.num_rows} planned")
        rel = f"{SHARDS}/{shard_id:05d}.parquet"
        with committed(store, rel) as tmp:
            pq.write_table(table, tmp, row_group_size=IMAGE_ROW_GROUP)
            record_entry(store, "", tmp, rel)
        return {"shard": shard_id, "rows": table.num_rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(got: pa.Table, planned: pa.Table, keys: list[str], dataset: str, settings: dict,
             extra_cols: list[str]) -> pa.Table:
    """img2dataset's rows in the stage's schema, in planned order, with a failed row for each it dropped;
    images the list says are stored turned (its `rotation_col`) turned upright."""
    from pipelines.resumable_parquet import to_arrow

    encode_format, rotation_col = settings["encode_format"], settings.get("rotation_col")

    by_key = {r["key"]: r for r in got.to_pylist()}
    rows = planned.to_pylist()
    data: dict[str, list] = {name: [] for name in SCHEMA.names}
    for key, plan_row in zip(keys, rows):
        r = by_key.get(key)
        flags = json.loads(plan_row[FLAGS]) if plan_row[FLAGS] else {}
        status, error = (r["status"], r["error_message"]) if r else ("failed_to_download", "dropped by img2dataset on an exception")
        error = error.strip() if isinstance(error, str) else error
        reason = classify(status, error)
        if r is None:
            reason = "img2dataset_error"
        elif "malformed_line" in flags:
            status, reason, error = "failed_to_read", "malformed_line", f"cannot parse the list's line: {flags['malformed_line']}"
        elif flags.get("invalid_utf8_url"):
            status, reason, error = "failed_to_read", "invalid_utf8_url", "the URL is not valid UTF-8"
        extra = {c: plan_row.get(c) for c in extra_cols if plan_row.get(c) is not None}
        extra.update({k: v for k, v in flags.items() if k == "caption_invalid_utf8"})
        values = {
            "key": f"{dataset}-{key}", "dataset": dataset, "url": plan_row["url"], "caption": plan_row["caption"],
            "width": r and r["width"], "height": r and r["height"], "original_width": r and r["original_width"],
            "original_height": r and r["original_height"], "status": status, "error_message": error, "reason": reason,
            "sha256": r and r.get("sha256"), "extra": json.dumps(extra, default=str) if extra else None,
            "image": r.get(encode_format) if r and reason is None else None,
        }
        degrees = rotation_degrees(plan_row.get(rotation_col)) if rotation_col and values["image"] else None
        if degrees:
            values["image"], values["width"], values["height"] = rotate(values["image"], degrees, encode_format,
                                                                        settings["encode_quality"])
            values["sha256"] = hashlib.sha256(values["image"]).hexdigest()
            values["extra"] = json.dumps({**extra, "rotated": degrees}, default=str)
        for k, v in values.items():
            data[k].append(v)
    return to_arrow(data, SCHEMA)


def download_all(ctx, stage: Store, plan: dict, settings: dict, dataset: str, extra_cols: list[str],
                 max_shard_retry: int) -> dict:
    """Every planned shard without its output, `concurrency` at a time, each retried up to `max_shard_retry` times;
    `stage`: the stage folder as a store."""
    import ray

    from simplear.workflow.lock import task_env
    from simplear.workflow.metrics import ProgressLine

    done = set(shard_keys(stage))
    todo = [i for i in range(plan["shards"]) if f"{SHARDS}/{i:05d}.parquet" not in done]
    oom_shard_count = max(5, len(str(plan["shards"])))
    stage.delete_prefix(WORK)  # attempts a kill cut short, in a stage folder an older release downloaded in
    task = ray.remote(download_shard).options(
        **ctx.resources.ray_options(), max_retries=0, name=f"{ctx.name}:shard",
        # cv2 reads its own pixel limit from the environment, once per process
        runtime_env=task_env(CV_IO_MAX_IMAGE_PIXELS=str(settings["max_decode_pixels"])),
    )
    ctx.log.info("%s: %d shards, %d to download, %d at a time", ctx.name, plan["shards"], len(todo), ctx.resources.concurrency)
    progress = ProgressLine(ctx.name, len(todo), ctx.progress_interval_s, unit="shards", run=ctx.store.uri)
    attempts: Counter = Counter()
    failed: dict[int, str] = {}
    in_flight: dict = {}
    queue = list(todo)
    while queue or in_flight:
        while queue and len(in_flight) < ctx.resources.concurrency:
            sid = queue.pop(0)
            attempts[sid] += 1
            in_flight[task.remote(sid, stage.uri, settings, dataset, extra_cols, oom_shard_count)] = sid
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        sid = in_flight.pop(ready[0])
        try:
            ray.get(ready[0])
            progress.add(1)
        except Exception as e:  # noqa: BLE001 - retried, then reported by shard
            first = str(getattr(e, "cause", None) or e).strip().splitlines()
            why = first[-1] if first else type(e).__name__
            if attempts[sid] <= max_shard_retry:
                ctx.log.warning("%s: shard %05d failed (try %d of %d): %s; retrying", ctx.name, sid, attempts[sid],
                                max_shard_retry + 1, why)
                queue.append(sid)
            else:
                failed[sid] = why
                ctx.log.error("%s: shard %05d failed %d times: %s", ctx.name, sid, attempts[sid], why)
    progress.add(0, force=True)
    if failed:
        names = ", ".join(f"{s:05d} ({w})" for s, w in sorted(failed.items())[:10])
        raise RuntimeError(f"{ctx.name}: {len(failed)} of {plan['shards']} shards failed after {max_shard_retry + 1} tries: {names}; "
                           "the others are kept, a rerun tries only these")
    return {"shards_retried": sum(1 for n in attempts.values() if n > 1), "read_problems": plan["read_problems"],
            "input_rows": plan["input_rows"]}


def settings_of(cfg) -> dict:
    quality = cfg.encode_quality if cfg.encode_quality is not None else (3 if cfg.encode_format == "png" else 95)
    keys = ("thread_count", "timeout", "retries", "number_sample_per_shard", "resize_mode", "image_size", "resize_only_if_bigger",
            "encode_format", "skip_reencode", "min_image_size", "max_image_area", "max_aspect_ratio", "user_agent_token",
            "disallowed_header_directives", "max_decode_pixels", "max_image_bytes")
    return {**{k: getattr(cfg, k) for k in keys}, "encode_quality": quality}

