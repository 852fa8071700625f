"""The download stage's output schema, where its shards are, and the short reasons failures are counted by."""

from __future__ import annotations

import pyarrow as pa

from simplear.storage import Store

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("reason", pa.string()),
        ("sha256", pa.string()),
        ("extra", pa.string()),
        ("image", pa.binary()),
    ]
)
SHARDS = "shards"
IMAGE_ROW_GROUP = 128  # rows per Parquet row group: later stages read a few rows' bytes by reference (pipelines.pixels)


def shard_keys(stage: Store) -> list[str]:
    """The converted shards in a stage folder (opened as a store), in key order: one listing, not a lookup per shard."""
    return [item.key for item in stage.list(SHARDS) if item.key.endswith(".parquet")]


def classify(status: str | None, error: str | None) -> str | None:
    """img2dataset's free-text error as a short reason to count by."""
    if status == "success":
        return None
    e = (error or "").lower()
    if e.startswith("http error "):
        return "http_" + e.split()[2].rstrip(":")
    rules = [  # the download's own refusals first (pipelines.download.fetch): their messages may name anything
        ("unsupported url scheme", "unsupported_scheme"),
        ("blocked address", "blocked_address"),
        ("response body too large", "too_large"),
        ("timed out", "timeout"),
        ("!buf.empty()", "empty_file"),
        ("cv_io_max_image_pixels", "too_large"),
        ("image area too large", "too_large"),
        ("decompression bomb", "too_large"),
        ("image decoding error", "undecodable"),
        ("cannot identify image", "undecodable"),
        ("truncated", "truncated"),
        ("incompleteread", "truncated"),
        ("image too small", "too_small"),
        ("aspect ratio too large", "aspect_ratio"),
        ("hash mismatch", "hash_mismatch"),
        ("x-robots-tag", "opted_out"),
        ("urlopen error", "connection_error"),
        ("connection", "connection_error"),
    ]
    for needle, reason in rules:
        if needle in e:
            return reason
    return "other"
