"""A rehearsal source set in the real release formats, generated deterministically and served on loopback.

What production meets, at a size that runs on 2 cores (`rows` is a parameter):
- a CC12M-style headerless TSV (`url<TAB>caption`) with captions and a URL that are not valid UTF-8 and
  a malformed line; a Megalith-10M-style Parquet with `url` (small) and `url_highres`;
- SA-1B-style tars (`sa_<id>.jpg` + `sa_<id>.json` per image) with captions in a webdataset-layout
  archive (`sa_<id>.txt`); a JourneyDB-style `imgs/NNN.tgz` with a JSONL of annotations that holds a
  malformed line;
- JPEGs of 256-1,280 px (most at most 512), some stored sideways with an EXIF orientation; URLs that
  answer 404, 500, never (a timeout), slowly, with a truncated body or with no body at all;
- hostile URLs: a `file://` URL of a local JPEG (`secret.jpg`, beside the site: never to be fetched),
  redirects to the metadata service's address and to that file, a body that claims 16 GiB.

Every image shows a red top-left quadrant on blue *as displayed*, so a stage can check it is upright.
`write_lists(folder, base_url)` writes the URL lists for a running server (`serve(folder)`), and
`write_manifests` the dataset manifests of the four sources.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import random
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

# EXIF orientation -> the transpose that stores a displayed image so that exif_transpose puts it back
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
FAULTS = ("404", "500", "timeout", "slow", "truncated", "empty", "metadata", "file", "huge")
SECRET = "secret.jpg"  # beside the served site, so only a `file://` URL or a redirect to one could reach it


def displayed(width: int, height: int) -> Image.Image:
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    return im


def is_upright(im: Image.Image) -> bool:
    """Red at the top-left quadrant's centre, blue at the others' (what `displayed` draws)."""
    rgb = im.convert("RGB")
    w, h = rgb.size
    tl = rgb.getpixel((w // 4, h // 4))
    others = [rgb.getpixel((3 * w // 4, h // 4)), rgb.getpixel((w // 4, 3 * h // 4)), rgb.getpixel((3 * w // 4, 3 * h // 4))]
    return tl[0] > 180 and tl[2] < 80 and all(p[2] > 180 and p[0] < 80 for p in others)


def jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    """A JPEG that shows `displayed(width, height)` once its EXIF orientation is applied."""
    im = displayed(width, height)
    exif = Image.Exif()
    if orientation != 1:
        im = im.transpose(STORED[orientation])
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _size(rng: random.Random) -> tuple[int, int]:
    big = rng.random() < 0.1
    lo, hi = (513, 1280) if big else (256, 512)
    return rng.randint(lo, hi), rng.randint(lo, hi)


def generate(folder: str | Path, rows: int = 1500, seed: int = 0, distinct_images: int = 120) -> dict:
    """Images, archives and annotations under `folder` (the URL lists need a server: `write_lists`)."""
    folder = Path(folder)
    rng = random.Random(seed)
    site = folder / "site" / "img"
    site.mkdir(parents=True, exist_ok=True)
    (folder / SECRET).write_bytes(jpeg(300, 300))
    images = []
    for i in range(distinct_images):
        w, h = _size(rng)
        orientation = rng.choice([6, 3, 8]) if i % 6 == 0 else 1
        (site / f"{i:05d}.jpg").write_bytes(jpeg(w, h, orientation))
        images.append({"file": f"{i:05d}.jpg", "width": w, "height": h, "orientation": orientation})
    n_web, n_megalith, n_sa, n_jdb = int(rows * 0.4), int(rows * 0.27), int(rows * 0.2), 0
    n_jdb = rows - n_web - n_megalith - n_sa
    layout = {"images": images, "cc12m": n_web, "megalith": n_megalith, "sa1b": n_sa, "journeydb": n_jdb, "seed": seed}

    sa = folder / "sa1b"
    sa.mkdir(exist_ok=True)
    captions = tarfile.open(sa / "sa1b_captions.tar", "w")
    per_tar = max(1, n_sa // 3)
    links = ["file_name\tcdn_link"]
    for t in range(0, n_sa, per_tar):
        name = f"sa_{t // per_tar:06d}.tar"
        links.append(f"{name}\thttps://example.invalid/{name}")
        with tarfile.open(sa / name, "w") as tar:
            for k in range(t, min(n_sa, t + per_tar)):
                img = images[k % len(images)]
                stem = f"sa_{k + 1}"
                _add(tar, f"{stem}.jpg", (site / img["file"]).read_bytes())
                meta = {"image": {"image_id": k + 1, "width": img["width"], "height": img["height"], "file_name": f"{stem}.jpg"},
                        "annotations": []}
                _add(tar, f"{stem}.json", json.dumps(meta).encode())
                if k % 10:  # one in ten has no caption: left to recaption
                    _add(captions, f"{stem}.txt", f"a rehearsal photo number {k} of a red and blue pattern".encode())
    captions.close()
    (sa / "sa1b_links.txt").write_text("\n".join(links) + "\n")

    jdb = folder / "journeydb" / "imgs"
    jdb.mkdir(parents=True, exist_ok=True)
    annotations = []
    per_tgz = max(1, n_jdb // 2)
    for t in range(0, n_jdb, per_tgz):
        with tarfile.open(jdb / f"{t // per_tgz:03d}.tgz", "w:gz") as tar:
            for k in range(t, min(n_jdb, t + per_tgz)):
                img = images[(k * 7) % len(images)]
                path = f"{t // per_tgz:03d}/{k:06d}.jpg"
                _add(tar, path, (site / img["file"]).read_bytes())
                annotations.append(json.dumps({"img_path": f"./{path}", "prompt": f"midjourney prompt {k}",
                                               "Task2": {"Caption": f"a generated picture {k}"}}))
    annotations.insert(len(annotations) // 2, '{"img_path": "./000/broken.jpg", "prompt": ')  # a malformed line
    (folder / "journeydb" / "train_anno.jsonl").write_text("\n".join(annotations) + "\n")
    (folder / "layout.json").write_text(json.dumps(layout, indent=2))
    return layout


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _url(base: str, rng: random.Random, images: list, k: int) -> str:
    """Most rows an image; about one in twenty a fault."""
    if k % 20 == 7:
        return f"{base}/fault/{FAULTS[(k // 20) % len(FAULTS)]}/{k}"
    return f"{base}/img/{images[k % len(images)]['file']}?row={k}"


def write_lists(folder: str | Path, base_url: str) -> None:
    folder = Path(folder)
    layout = json.loads((folder / "layout.json").read_text())
    rng = random.Random(layout["seed"] + 1)
    images = layout["images"]
    lines = []
    for k in range(layout["cc12m"]):
        caption = f"a web photo {k} of a red and blue pattern".encode()
        if k % 97 == 5:
            caption = f"caf\xe9 photo {k}".encode("latin-1")  # not UTF-8
        lines.append(_url(base_url, rng, images, k).encode() + b"\t" + caption)
    lines.insert(3, b"http://127.0.0.1:9/\xff\xfe.jpg\tthe URL is not UTF-8")
    lines.insert(11, b"a malformed line\twith three\tcolumns")
    lines.insert(13, f"file://{(folder / SECRET).resolve()}\ta local file, never to be read".encode())
    (folder / "cc12m.tsv").write_bytes(b"\n".join(lines) + b"\n")
    n = layout["megalith"]
    urls = [_url(base_url, rng, images, 10_000 + k) for k in range(n)]
    pq.write_table(pa.table({
        "url": [u.replace("/img/", "/small/") for u in urls],  # the small Flickr size, which a 512 px pipeline must not use
        "url_highres": urls,
        "url_source": [f"https://www.flickr.com/photos/x/{k}" for k in range(n)],
    }), folder / "megalith.parquet")


def write_manifests(folder: str | Path) -> Path:
    """The four sources' dataset manifests in `<folder>/datasets/`; returns that folder."""
    folder = Path(folder)
    out = folder / "datasets"
    out.mkdir(exist_ok=True)
    common = {"license": "generated for the rehearsal"}
    manifests = {
        "r_cc12m": {"source": "url_list", "description": "CC12M-style headerless TSV", "url_list": "../cc12m.tsv",
                    "list_origin": "pipelines/rehearsal.py", "input_format": "tsv", "column_names": ["url", "caption"],
                    "url_col": "url", "caption_col": "caption", "allow_private_addresses": True},
        "r_megalith": {"source": "url_list", "description": "Megalith-10M-style Parquet", "url_list": "../megalith.parquet",
                       "list_origin": "pipelines/rehearsal.py", "input_format": "parquet", "url_col": "url_highres",
                       "save_additional_columns": ["url_source"], "allow_private_addresses": True},
        "r_sa1b": {"source": "archives", "description": "SA-1B-style tars", "archives": "../sa1b/sa_*.tar",
                   "links_file": "../sa1b/sa1b_links.txt", "image_extensions": [".jpg"],
                   "captions": {"path": "../sa1b/sa1b_captions.tar", "format": "webdataset", "key_field": "stem",
                                "caption_field": "txt", "match": "stem"}},
        "r_journeydb": {"source": "archives", "description": "JourneyDB-style imgs/NNN.tgz", "archives": "../journeydb/imgs/*.tgz",
                        "image_extensions": [".jpg"],
                        "captions": {"path": "../journeydb/train_anno.jsonl", "format": "jsonl", "key_field": "img_path",
                                     "caption_field": "Task2.Caption", "match": "path"}},
    }
    for name, m in manifests.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **common, **m}, sort_keys=False))
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    """The site, plus `/small/` (a smaller copy's URL) and `/fault/<kind>/` answers (`FAULTS`)."""

    timeout_s = 3.0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path.startswith("/small/"):
            self.send_error(404, "only the high-resolution URL serves the image here")
            return
        if not path.startswith("/fault/"):
            super().do_GET()
            return
        kind = path.split("/")[2]
        body = jpeg(300, 300)
        if kind in ("404", "500"):
            self.send_error(int(kind))
        elif kind == "timeout":
            time.sleep(self.timeout_s)
            with contextlib.suppress(OSError):  # the client gave up long ago
                self.send_error(503)
        elif kind == "slow":  # slow but within the timeout: the image arrives
            self._head(len(body))
            for i in range(0, len(body), len(body) // 4 + 1):
                self.wfile.write(body[i:i + len(body) // 4 + 1])
                self.wfile.flush()
                time.sleep(0.2)
        elif kind == "truncated":
            self._head(len(body))
            self.wfile.write(body[: len(body) // 3])
        elif kind in ("metadata", "file"):
            secret = (Path(self.directory).parent / SECRET).resolve()
            self.send_response(302)
            target = "http://169.254.169.254/latest/meta-data/" if kind == "metadata" else f"file://{secret}"
            self.send_header("Location", target)
            self.end_headers()
        elif kind == "huge":  # the header alone must refuse it: no body follows
            self._head(16 << 30)
        else:  # empty
            self._head(0)

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(length))
        self.end_headers()


def serve(folder: str | Path, host: str = "127.0.0.1", timeout_s: float = 3.0):
    """Serve `<folder>/site` with its faults (a context manager yielding the base URL). `timeout_s`: how long a
    `timeout` URL stalls (longer than the download's timeout)."""
    from pipelines.demo_shapes import serve as serve_folder

    return serve_folder(Path(folder) / "site", host, handler=type("Handler", (_Handler,), {"timeout_s": timeout_s}))
