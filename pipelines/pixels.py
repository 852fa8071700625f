"""Where a row's pixels lie, so the image bytes are stored once: in the download's shards.

The filter reads the download's bytes and writes, for each kept row, `image_file` (the download part,
relative to the run folder, e.g. `download_cc12m/shards/00003.parquet`) and `image_row` (its row in
that file) instead of another copy of the bytes; recaption passes both on. A stage that needs the
pixels (recaption, tokenize) reads them back with `fetch`, which opens only the Parquet row groups
holding the rows it wants (the download writes `IMAGE_ROW_GROUP` rows per group, see `pipelines.download.schema`).

Each of these stages also records `pixels.json` (one of its outputs, so in its manifest): the files
its rows point into, with the size, checksum and rows the download recorded. A stage reading references
checks that list once at its start (`check_pixel_files`), so a missing or rewritten download part
is a clear error naming the file, not a join by key over 50M rows or a failure deep in a task.
"""

from __future__ import annotations

import bisect
import io
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from simplear.storage import Store, join, open_store
from simplear.workflow.manifest import commit_json

IMAGE_FILE, IMAGE_ROW = "image_file", "image_row"
REF_FIELDS = [pa.field(IMAGE_FILE, pa.string()), pa.field(IMAGE_ROW, pa.int64())]
PIXELS_JSON = "pixels.json"
WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (PNG, TIFF): values up to 65,535
PNG_KEEPS = ("1", "L", "LA", "P", "RGB", "RGBA")  # modes a PNG stores as they are, 8 bits per channel


def fetch(files: Sequence[str], rows: Sequence[int], run: str | Path) -> list[bytes | None]:
    """The image bytes at each (file, row), reading only the row groups that hold them; None for a missing row.
    `run`: the run dir (a path or URI); `files` are relative to it."""
    fs, root = open_store(run).filesystem()
    out: list[bytes | None] = [None] * len(files)
    wanted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, (f, r) in enumerate(zip(files, rows)):
        if f is not None and r is not None:
            wanted[f].append((int(r), i))
    for f, pairs in wanted.items():
        pf = pq.ParquetFile(f"{root}/{f}", filesystem=fs)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        by_group: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for r, i in pairs:
            if 0 <= r < starts[-1]:
                by_group[bisect.bisect_right(starts, r) - 1].append((r, i))
        for g, members in by_group.items():
            column = pf.read_row_group(g, columns=["image"]).column(0)
            for r, i in members:
                out[i] = column[r - starts[g]].as_py()
    return out


def pixel_files(ctx) -> dict[str, dict]:
    """The files the rows of this stage's inputs point into, by run-relative path, with their manifest entries.

    An input that keeps its own bytes (a download) points into its own `shards/`; one that keeps
    references lists them in its `pixels.json`."""
    files: dict[str, dict] = {}
    for need in ctx.needs:
        manifest = ctx.input_manifest(need)
        listed = {o["path"] for o in manifest["outputs"]}
        if PIXELS_JSON in listed:
            files.update(ctx.store.read_json(join(need, PIXELS_JSON))["files"])
        else:
            for o in manifest["outputs"]:
                if o["path"].startswith("shards/") and o["path"].endswith(".parquet"):
                    files[f"{need}/{o['path']}"] = {k: o.get(k) for k in ("bytes", "sha256", "rows")}
    return files


def check_pixel_files(store: Store, files: dict[str, dict], stage: str) -> None:
    """Every listed file is there with the size its manifest recorded, or the stage fails naming them. One listing
    per folder, not a look-up per file: on object storage that is one request per thousand files."""
    sizes = {item.key: item.size for folder in sorted({rel.rsplit("/", 1)[0] for rel in files})
             for item in store.list(folder)}
    bad = []
    for rel, entry in files.items():
        if rel not in sizes:
            bad.append(f"{rel} is missing")
        elif entry.get("bytes") is not None and sizes[rel] != entry["bytes"]:
            bad.append(f"{rel} is {sizes[rel]} bytes, its manifest says {entry['bytes']}")
    if bad:
        raise FileNotFoundError(f"{stage}: the images its input rows point to are gone or changed "
                                f"({'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}): rerun the stages that made them")


def record_pixel_files(ctx) -> None:
    """Check the files this stage's input rows point into and list them in its `pixels.json`."""
    files = pixel_files(ctx)
    check_pixel_files(ctx.store, files, ctx.name)
    commit_json(ctx.store, ctx.key(PIXELS_JSON), {"files": files})


def eight_bit(im):
    """`im` in a mode a PNG stores at 8 bits per channel: 16-bit grey scaled down (a plain conversion clips every
    value above 255 to white), CMYK and the other colour spaces as RGB; anything else as it is. The download
    stores new images through it (`pipelines.download.images.upright`) and `open_images` decodes through it,
    so bytes a finished download kept at 16 bits are read the same way."""
    from PIL import Image

    if im.mode in WIDE:
        import numpy as np

        grey = np.clip(np.asarray(im, dtype=np.int64), 0, 65_535) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L")
    return im if im.mode in PNG_KEEPS else im.convert("RGB")


def open_images(table: pa.Table, run: str | Path) -> tuple[list, list[str | None], list[str | None]]:
    """Each row's image, fetched by reference and decoded to RGB through `eight_bit` (None with a reason and message
    where not)."""
    from PIL import Image

    files, rows = table[IMAGE_FILE].to_pylist(), table[IMAGE_ROW].to_pylist()
    data = fetch(files, rows, run)
    images: list = [None] * len(data)
    reasons: list[str | None] = [None] * len(data)
    errors: list[str | None] = [None] * len(data)
    for i, raw in enumerate(data):
        if raw is None:
            reasons[i], errors[i] = "missing_image", f"no image at {files[i]} row {rows[i]}"
            continue
        try:
            with Image.open(io.BytesIO(raw)) as im:
                images[i] = eight_bit(im).convert("RGB")
        except Exception as e:  # noqa: BLE001 - recorded, never raised
            reasons[i], errors[i] = "undecodable", f"{type(e).__name__}: {e}"
    return images, reasons, errors


def set_reasons(table: pa.Table, reasons: list[str | None], errors: list[str | None]) -> pa.Table:
    """`table` with its `reason` and `error_message` columns set to these (replaced when it has them)."""
    table = table.drop_columns([c for c in ("reason", "error_message") if c in table.column_names])
    table = table.append_column("reason", pa.array(reasons, pa.string()))
    return table.append_column("error_message", pa.array(errors, pa.string()))


def raw_rgb(images: list) -> pa.Array:
    """Decoded images as raw RGB bytes (what the model actors get: no decode left for them), null where None."""
    return pa.array([None if im is None else im.tobytes() for im in images], pa.binary())


def from_raw_rgb(data: bytes, width: int, height: int):
    from PIL import Image

    return Image.frombytes("RGB", (int(width), int(height)), data)
