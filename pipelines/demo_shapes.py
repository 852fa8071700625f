"""The demo data set: coloured shapes on coloured backgrounds, drawn deterministically, served over loopback HTTP.

`generate(folder, params)` writes `images/*.png|jpg` and `urls.parquet` (url path, caption, kind) where
`kind` says what each entry is on purpose: `ok`, or one of the broken kinds below, so tests can check
that every broken file ends up with the right reason. `serve(folder)` is a loopback HTTP server; the
download stage starts and stops it around img2dataset.

Captions name the shape and both colours ("a red circle on a blue background"), in the grammar of
`simplear.demo_captions` (which rewards and evaluations read colours back with).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from simplear.datasets import DemoShapesParams
from simplear.demo_captions import PALETTE, SHAPES, caption_for, draw, held_out_combinations, parse_caption

BROKEN_KINDS = ("truncated", "not_an_image", "zero_byte", "huge_header", "missing")


def _huge_header_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A valid PNG signature and IHDR claiming a giant image, followed by a tiny IDAT: a decompression bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _spec_digest(params: DemoShapesParams) -> str:
    return hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]


def generate(folder: str | Path, params: DemoShapesParams) -> Path:
    """Write the set under `folder` (skipped when a previous call with the same params finished); returns urls.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    done = folder / "_DONE.json"
    digest = _spec_digest(params)
    if done.exists() and json.loads(done.read_text()).get("params") == digest:
        return folder / "urls.parquet"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)

    rng = random.Random(params.seed)
    colours = list(PALETTE)
    weights = params.short_edge_weights or [1.0] * len(params.short_edges)
    held_out = set(held_out_combinations(params.held_out, params.seed))

    def pick() -> tuple[str, str, str]:
        """A combination not held out (drawn again if it is; with no held-out set the draws are those of before)."""
        while True:
            fg, bg = rng.sample(colours, 2)
            shape = rng.choice(SHAPES)
            if (fg, shape, bg) not in held_out:
                return fg, shape, bg

    rows: list[dict] = []
    for i in range(params.count):
        fg, shape, bg = pick()
        short = rng.choices(params.short_edges, weights)[0]
        long = round(short * rng.choice(params.aspect_ratios))
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
        img = draw(fg, shape, bg, width, height, rng)
        ext = "jpg" if rng.random() < params.jpeg_fraction else "png"
        name = f"{i:06d}.{ext}"
        img.save(images / name, **({"quality": 95} if ext == "jpg" else {}))
        rows.append({"path": f"images/{name}", "caption": caption_for(fg, shape, bg), "kind": "ok"})

    broken_counts = {k: getattr(params, k) for k in BROKEN_KINDS}
    for kind, n in broken_counts.items():
        for j in range(n):  # (a truncated image decodes partly and may be kept: no held-out caption either)
            fg, shape, bg = pick()
            name = f"{kind}_{j:03d}"
            if kind == "truncated":
                buf = io.BytesIO()
                draw(fg, shape, bg, 96, 96, rng).save(buf, format="JPEG", quality=95)
                data = buf.getvalue()
                (images / f"{name}.jpg").write_bytes(data[: len(data) // 2])
                path = f"images/{name}.jpg"
            elif kind == "not_an_image":
                (images / f"{name}.jpg").write_bytes(rng.randbytes(2048))
                path = f"images/{name}.jpg"
            elif kind == "zero_byte":
                (images / f"{name}.png").write_bytes(b"")
                path = f"images/{name}.png"
            elif kind == "huge_header":
                (images / f"{name}.png").write_bytes(_huge_header_png())
                path = f"images/{name}.png"
            else:  # missing: listed, never written
                path = f"images/{name}.png"
            rows.append({"path": path, "caption": caption_for(fg, shape, bg), "kind": kind})

    # broken entries are spread through the list so they land in different download shards
    order = list(range(len(rows)))
    random.Random(params.seed + 1).shuffle(order)
    rows = [rows[i] for i in order]
    table = pa.table({k: [r[k] for r in rows] for k in ("path", "caption", "kind")})
    pq.write_table(table, folder / "urls.parquet")
    done.write_text(json.dumps({"params": digest, "rows": len(rows)}))
    return folder / "urls.parquet"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextmanager
def serve(folder: str | Path, host: str = "127.0.0.1", handler: type = _QuietHandler) -> Iterator[str]:
    """Serve `folder` over HTTP on a free port of `host` for the duration of the block; yields the base URL.
    `handler`: a SimpleHTTPRequestHandler of one's own (the rehearsal's answers faults)."""
    server = http.server.ThreadingHTTPServer((host, 0), lambda *a, **kw: handler(*a, directory=str(folder), **kw))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


__all__ = ["BROKEN_KINDS", "PALETTE", "SHAPES", "caption_for", "draw", "generate", "parse_caption", "serve"]
