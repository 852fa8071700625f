"""filter: keep the rows whose image decodes and whose short edge is at least `min_short_edge`.

Reads every `shards/` file its input stages recorded (several downloads can feed one filter), streams
them through Ray Data tasks (one per download part), and writes `shards/` (kept rows: the download
schema less its status columns and less the bytes, with `image_file` / `image_row` saying where the
bytes lie, see `pipelines.pixels`), `pixels.json` (the download parts those rows point into) and
`rejected/` (key, dataset, url, status, reason, error_message: no image bytes). Reasons:
`download:<reason>` for rows the download already failed, then `no_image`, `undecodable`, `too_large`
(decompression-bomb sized), `too_small`, `aspect_ratio`.

Sizes come from the image itself (header read, then a full decode when `verify_decode`), not from
upstream columns, so archives ingested without decoding are checked the same way.
"""

from __future__ import annotations

import io
import warnings

import pyarrow as pa
from pydantic import Field

from pipelines.download import SCHEMA as DOWNLOAD_SCHEMA
from pipelines.pixels import IMAGE_FILE, IMAGE_ROW, REF_FIELDS, record_pixel_files
from pipelines.resumable_parquet import SRC_FILE, SRC_ROW, SplitByReason, parts_progress, run_stage
from simplear.config import StrictModel
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.registry import register_stage

# the download schema less its status columns (every kept row is a good image) and less the bytes, which stay put
KEPT_SCHEMA = pa.schema([f for f in DOWNLOAD_SCHEMA if f.name not in ("status", "error_message", "reason", "image")] + REF_FIELDS)
REJECTED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
COLUMNS = [f.name for f in DOWNLOAD_SCHEMA]


class FilterConfig(StrictModel):
    min_short_edge: int = Field(ge=1, description="512 for pretraining, 1024 for SFT in production")
    max_aspect_ratio: float | None = Field(None, ge=1.0, description="long edge / short edge, none for no bound")
    verify_decode: bool = Field(True, description="decode every image fully (catches truncated files)")
    max_pixels: int = Field(178_956_970, ge=1, description="larger images are rejected as too_large (PIL's bomb limit)")
    batch_size: int = Field(256, ge=1)


def check_image(data, min_short_edge: int, max_aspect_ratio: float | None, verify_decode: bool, max_pixels: int):
    """(reason or None, width, height, error message) for one image's bytes."""
    from PIL import Image

    if data is None or len(data) == 0:
        return ("no_image" if data is None else "empty_file"), None, None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return "too_large", width, height, f"{width}x{height} pixels > {max_pixels}"
                if verify_decode:
                    im.load()
    except Image.DecompressionBombError as e:
        return "too_large", None, None, str(e)
    except Exception as e:  # noqa: BLE001 - a bad image is a reason, never a crash
        return "undecodable", None, None, f"{type(e).__name__}: {e}"
    short, long = min(width, height), max(width, height)
    if short < min_short_edge:
        return "too_small", width, height, f"short edge {short} < {min_short_edge}"
    if max_aspect_ratio is not None and long / short > max_aspect_ratio:
        return "aspect_ratio", width, height, f"aspect ratio {long / short:.2f} > {max_aspect_ratio}"
    return None, width, height, None


def filter_batch(batch, *, min_short_edge: int, max_aspect_ratio: float | None, verify_decode: bool, max_pixels: int):
    reasons, widths, heights, errors = [], [], [], []
    for status, up_reason, up_error, data in zip(batch["status"], batch["reason"], batch["error_message"], batch["image"]):
        if status != "success":
            reasons.append(f"download:{up_reason or status}")
            widths.append(None)
            heights.append(None)
            errors.append(up_error)
            continue
        reason, w, h, err = check_image(data, min_short_edge, max_aspect_ratio, verify_decode, max_pixels)
        reasons.append(reason)
        widths.append(w)
        heights.append(h)
        errors.append(err)
    batch = batch.copy()
    batch["reason"] = reasons
    batch["width"] = widths
    batch["height"] = heights
    batch["error_message"] = errors
    batch["status"] = ["kept" if r is None else "rejected" for r in reasons]
    batch[IMAGE_FILE], batch[IMAGE_ROW] = batch[SRC_FILE], batch[SRC_ROW]
    return batch.drop(columns=["image"])


@register_stage("filter", FilterConfig, version=2, operational=("batch_size",), progress=parts_progress,
                object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: FilterConfig = ctx.config
    record_pixel_files(ctx)
    result = run_stage(
        ctx,
        folders=["shards", "rejected"],
        split=SplitByReason(KEPT_SCHEMA, REJECTED_SCHEMA),
        process=filter_batch,
        process_kwargs={
            "min_short_edge": cfg.min_short_edge,
            "max_aspect_ratio": cfg.max_aspect_ratio,
            "verify_decode": cfg.verify_decode,
            "max_pixels": cfg.max_pixels,
        },
        batch_size=cfg.batch_size,
        columns=COLUMNS,
    )
    result.metrics["min_short_edge"] = cfg.min_short_edge
    return result
