"""Hostile inputs to the download stage (issue 19), each probe refused: URL lists that reach local files or internal
addresses or send endless bodies, archive members that expand to gigabytes, JSON lines nested past the recursion
limit, and images that came out sideways or white. No Ray: the functions its tasks run are called here."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import rehearsal
from pipelines.download import DownloadConfig
from pipelines.download.archives import MAX_HEADER_BYTES, archive_rows, archive_stems, load_captions
from pipelines.download.fetch import FetchPolicy, Refused, address_problem, fetcher, read_capped
from pipelines.download.images import upright
from pipelines.download.schema import classify
from pipelines.download.url_shards import download_shard, plan_shards, read_list, settings_of
from pipelines.pixels import IMAGE_FILE, IMAGE_ROW, open_images
from simplear.datasets import ArchiveSource

GiB = 1 << 30
DEEP = b"[" * 100_000 + b"]" * 100_000  # one JSON line nested past the recursion limit


# ---- URL lists: schemes, addresses, bodies ----------------------------------------------------------------


@pytest.mark.parametrize("ip,allow_private,problem", [
    ("93.184.216.34", False, None),
    ("2606:2800:220:1::", False, None),
    ("127.0.0.1", False, "loopback"),
    ("127.0.0.1", True, None),
    ("::1", False, "loopback"),
    ("10.1.2.3", False, "private"),
    ("192.168.0.7", True, None),
    ("100.64.0.1", False, "private"),  # carrier-grade NAT: not global
    ("169.254.169.254", True, "link-local"),  # the metadata service: refused even with the opt-in
    ("::ffff:169.254.169.254", True, "link-local"),
    ("fe80::1%eth0", True, "link-local"),
    ("224.0.0.251", True, "multicast"),
    ("0.0.0.0", True, "unspecified"),
])
def test_addresses_are_judged(ip, allow_private, problem):
    assert address_problem(ip, allow_private) == problem


def fake_network(monkeypatch, answers: list[str]):
    """A resolver that answers `answers` in turn (a rebinding DNS server) and a network that connects nowhere;
    returns the names resolved and the addresses connected to."""
    resolved, connected = [], []

    def getaddrinfo(host, port, *args, **kwargs):
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[len(resolved) - 1], port))]

    def create_connection(address, *args, **kwargs):
        connected.append(address)
        raise ConnectionRefusedError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return resolved, connected


def test_a_name_is_resolved_once_and_the_judged_address_is_the_one_connected(monkeypatch):
    resolved, connected = fake_network(monkeypatch, ["93.184.216.34", "127.0.0.1"])
    _, stream, error = fetcher(FetchPolicy(False, 1 << 20))((0, "http://rebind.test/a.jpg"), 2, None, None)
    assert stream is None and classify("failed_to_download", error) == "connection_error"
    assert resolved == ["rebind.test"] and connected == [("93.184.216.34", 80)]  # never the name, never loopback


def test_a_name_that_resolves_to_the_metadata_service_is_never_connected(monkeypatch):
    resolved, connected = fake_network(monkeypatch, ["169.254.169.254"])
    _, stream, error = fetcher(FetchPolicy(True, 1 << 20))((0, "http://metadata.test/latest/meta-data/"), 2, None, None)
    assert stream is None and error == "blocked address 169.254.169.254 (link-local) for host metadata.test"
    assert classify("failed_to_download", error) == "blocked_address" and resolved and not connected


class Body:
    """A response whose bytes are counted as they are read."""

    def __init__(self, data: bytes, length: int | None = None):
        self.headers = {} if length is None else {"Content-Length": str(length)}
        self._data, self.read_bytes = io.BytesIO(data), 0

    def read(self, n: int) -> bytes:
        chunk = self._data.read(n)
        self.read_bytes += len(chunk)
        return chunk


def test_a_body_is_read_with_a_cap():
    assert read_capped(Body(b"x" * 4096), 4096) == b"x" * 4096
    endless = Body(b"x" * (8 << 20))  # no Content-Length: stopped one byte past the cap
    with pytest.raises(Refused, match="response body too large"):
        read_capped(endless, 4096)
    assert endless.read_bytes == 4097
    claimed = Body(b"x" * 10, length=16 * GiB)  # refused from the header, nothing read
    with pytest.raises(Refused, match="Content-Length 17179869184 > max_image_bytes 4096"):
        read_capped(claimed, 4096)
    assert claimed.read_bytes == 0
    with pytest.raises(Exception, match="IncompleteRead"):  # a cut body is still a truncated one
        read_capped(Body(b"x" * 10, length=20), 4096)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The rehearsal's server (its faults include the hostile ones) with one image; yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("site")
    rehearsal.generate(folder, rows=4, distinct_images=1)
    with rehearsal.serve(folder) as base:
        yield folder, base


def download(tmp_path, site, allow_private: bool, **config) -> dict[str, dict]:
    """One planned shard downloaded in this process by `download_shard` (what its Ray task runs), rows by caption."""
    folder, base = site
    lines = [f"{base}/img/00000.jpg\tan image", f"file://{(folder / rehearsal.SECRET).resolve()}\ta local file",
             f"{base}/fault/file/1\ta redirect to the file",
             f"{base}/fault/metadata/1\ta redirect to the metadata service",
             f"{base}/fault/huge/1\ta body of 16 GiB", f"{base}/fault/truncated/1\ta cut body"]
    stage = tmp_path / f"stage-{allow_private}-{len(config)}"
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    plan_shards(stage, [str(tmp_path / "list.tsv")], "tsv", "url", "caption", [], ["url", "caption"], 100)
    settings = settings_of(DownloadConfig(dataset="web", timeout=3, thread_count=6, **config))
    download_shard(0, str(stage), {**settings, "allow_private_addresses": allow_private}, "web", [], 5)
    return {r["caption"]: r for r in pq.read_table(stage / "shards/00000.parquet").to_pylist()}


def test_hostile_urls_on_the_rehearsal_server_are_failed_rows(tmp_path, site):
    rows = download(tmp_path, site, allow_private=True)
    assert rows["an image"]["status"] == "success" and rows["an image"]["image"]
    assert {c: r["reason"] for c, r in rows.items() if c != "an image"} == {
        "a local file": "unsupported_scheme", "a redirect to the file": "unsupported_scheme",
        "a redirect to the metadata service": "blocked_address", "a body of 16 GiB": "too_large",
        "a cut body": "truncated"}
    assert all(r["image"] is None for c, r in rows.items() if c != "an image")

    refused = download(tmp_path, site, allow_private=False)  # no opt-in in the manifest: loopback is refused
    assert {c: r["reason"] for c, r in refused.items()} == {
        **{c: "blocked_address" for c in rows}, "a local file": "unsupported_scheme"}
    assert refused["an image"]["error_message"].startswith("blocked address 127.0.0.1 (loopback)")

    capped = download(tmp_path, site, allow_private=True, max_image_bytes=1000)
    assert capped["an image"]["reason"] == "too_large" and capped["an image"]["image"] is None


def test_a_hostile_json_line_costs_that_line_only(tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_bytes(b"\n".join([
        json.dumps({"url": "http://x/a.jpg", "caption": "kept"}).encode(),
        DEEP,
        b'{"url": ' + b"9" * 5000 + b"}",  # past int's digit limit: a ValueError
        b'["not", "an", "object"]',
        json.dumps({"url": 5, "caption": {"nested": [1, 2]}}).encode(),
    ]) + b"\n")
    malformed: list[str] = []
    (batch,) = read_list(str(listing), "jsonl", ["url", "caption"], None, malformed)
    assert batch == {"url": ["http://x/a.jpg", "5"], "caption": ["kept", '{"nested": [1, 2]}']}
    assert len(malformed) == 3 and malformed[0].startswith("[[[")


# ---- archives ---------------------------------------------------------------------------------------------


def png(size=(24, 16), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes, **pax) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.pax_headers = len(data), pax
    tar.addfile(info, io.BytesIO(data))


def add_sparse(tar: tarfile.TarFile, name: str, real_size: int) -> None:
    """A GNU sparse 1.0 member (what `tar --sparse` writes): one byte stored, `real_size` once expanded."""
    stored = f"1\n{real_size - 1}\n1\n".encode().ljust(512, b"\0") + b"\xff"
    add(tar, name, stored, **{"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                              "GNU.sparse.realsize": str(real_size)})


def archive_source(tmp_path, captions: dict | None = None) -> ArchiveSource:
    return ArchiveSource(name="t", source="archives", description="d", license="l", archives="*.tar",
                         image_extensions=[".png", ".jpg"], captions=captions, base_dir=tmp_path)


def ingest(path, ds, max_bytes: int) -> list[dict]:
    return list(archive_rows(str(path), "a", "t", ds, {}, 10**8, max_bytes))


def test_sparse_and_oversized_members_are_failed_rows_never_read(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "0.png", png())
        add_sparse(tar, "1.png", 6 * GiB)  # the probe: 10 KB on disk, 6 GiB once read
        add(tar, "2.png", png((300, 300)))  # over the cap below
        add(tar, "3.png", png())
    assert path.stat().st_size < 20_000
    tracemalloc.start()
    try:
        rows = ingest(path, archive_source(tmp_path), max_bytes=len(png()) + 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("success", None), ("failed_to_read", "sparse_member"), ("failed_to_read", "too_large"), ("success", None)]
    assert "6442450944 bytes once expanded" in rows[1]["error_message"] and rows[1]["image"] is None
    assert rows[2]["error_message"].startswith("archive member of") and rows[3]["width"] == 24


def test_an_extended_header_too_large_to_hold_ends_the_archive_with_a_row(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "0.png", png())
        add(tar, "1.png", png(), comment="x" * (MAX_HEADER_BYTES + 1))
    rows = ingest(path, archive_source(tmp_path), max_bytes=1 << 20)
    assert [r["status"] for r in rows] == ["success", "failed_to_read"]
    assert rows[1]["reason"] == "too_large" and "extended header" in rows[1]["error_message"]


def test_the_caption_archive_reads_only_caption_members_and_a_hostile_record_costs_itself(tmp_path):
    with tarfile.open(tmp_path / "captions.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        add_sparse(tar, "sa_1.jpg", 6 * GiB)  # an image in the caption archive: never read
        add(tar, "sa_1.txt", b"a caption")
        add_sparse(tar, "sa_2.txt", 6 * GiB)  # a caption member that expands: skipped unread
        add(tar, "sa_3.txt", b"x" * 5000)  # over the cap below
        add(tar, "sa_4.txt", b"after a header bomb", comment="x" * (MAX_HEADER_BYTES + 1))  # ends the archive
    spec = {"path": "captions.tar", "format": "webdataset", "key_field": "stem", "caption_field": "txt",
            "match": "stem"}
    tracemalloc.start()
    try:
        captions = load_captions(archive_source(tmp_path, spec), max_bytes=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert captions == {"sa_1": "a caption"} and peak < 16 << 20

    (tmp_path / "anno.jsonl").write_bytes(b"\n".join([
        DEEP, b'{"img_path": "0.png", "caption": "kept"}', b'{"img_path": "1.png", "caption": ' + b"7" * 5000 + b"}",
    ]) + b"\n")
    spec = {"path": "anno.jsonl", "format": "jsonl", "key_field": "img_path", "caption_field": "caption"}
    assert load_captions(archive_source(tmp_path, spec), max_bytes=4096) == {"0.png": "kept"}


def test_archive_stems_are_distinct_and_keep_the_names_receipts_gave(tmp_path):
    receipts = tmp_path / "_archives"
    receipts.mkdir()
    third = "/third/b.tar"
    stems = archive_stems(["/d/a.tar", "/d/a.tgz", "/d/b.tar", "/other/b.tar", third, "/d/000.tgz"], receipts)
    assert stems == {"/d/000.tgz": "000", "/d/a.tar": "a", "/d/a.tgz": "a.tgz", "/d/b.tar": "b",
                     "/other/b.tar": "b.tar", third: stems[third]}
    assert stems[third].startswith("b.tar-") and len(set(stems.values())) == 6

    # a finished run: a.tgz was ingested alone as `a`, c.tar from a folder since moved, z.tar is gone now
    for stem, archive in {"a": "/d/a.tgz", "c": "/moved/c.tar", "z": "/d/z.tar"}.items():
        (receipts / f"{stem}.json").write_text(json.dumps({"archive": archive, "bytes": 1, "mtime_ns": 1}))
    again = archive_stems(["/d/a.tar", "/d/a.tgz", "/d/c.tar", "/d/z.tgz"], receipts)
    assert again == {"/d/a.tgz": "a", "/d/a.tar": "a.tar", "/d/c.tar": "c", "/d/z.tgz": "z.tgz"}


# ---- images ------------------------------------------------------------------------------------------------


def test_a_cmyk_jpeg_with_an_exif_rotation_comes_out_upright_in_rgb():
    stored = rehearsal.displayed(60, 40).transpose(rehearsal.STORED[6]).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    data, error = upright(buf.getvalue(), 10**8)
    im = Image.open(io.BytesIO(data))
    assert error is None and im.format == "PNG" and im.mode == "RGB" and im.size == (60, 40)
    assert rehearsal.is_upright(im)


def test_16_bit_greys_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 30_000, np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    data, error = upright(buf.getvalue(), 10**8)  # at download: stored 8 bits deep
    assert error is None and Image.open(io.BytesIO(data)).getpixel((0, 0)) == 30_000 >> 8
    # bytes a finished download kept at 16 bits: decoded for the models the same way
    pq.write_table(pa.table({"image": [buf.getvalue()]}), tmp_path / "part.parquet")
    images, reasons, _ = open_images(pa.table({IMAGE_FILE: ["part.parquet"], IMAGE_ROW: [0]}), tmp_path)
    assert reasons == [None] and images[0].getpixel((3, 3)) == (117, 117, 117)
