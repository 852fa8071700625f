"""download on its own: a rerun fetches only the missing shards; local archives (SA-1B / JourneyDB layout) are ingested."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipelines_support import data_workflow, manifest_of, read_stage
from simplear.workflow.engine import RunFailed, run_workflow, select, workflow_status
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow


def test_a_rerun_after_a_kill_downloads_only_the_missing_shard(ray_session, tmp_path):
    path = data_workflow(tmp_path, count=90, params={"missing": 2, "truncated": 1, "not_an_image": 1, "zero_byte": 1, "huge_header": 1},
                         keep=("download",), stages={"download": {"config": {"number_sample_per_shard": 40}}})
    wf = load_workflow(path)
    run_workflow(wf, select(wf))
    stage = wf.stage_dir("download")
    first = manifest_of(stage)
    assert first["metrics"]["shards"] == 3 and first["rows"] == 96
    keys_before = sorted(read_stage(stage, "shards", ["key"])["key"])
    urls_mtime = (stage / "_source/urls.parquet").stat().st_mtime_ns

    # what a kill during shard 1 leaves: no manifest, no shard 1, a half-done attempt folder
    (stage / MANIFEST).unlink()
    (stage / "shards/00001.parquet").unlink()
    (stage / "_img2dataset/00001-dead").mkdir(parents=True)
    statuses = run_workflow(wf, select(wf))
    assert statuses["download"].state == "done"
    again = manifest_of(stage)["metrics"]
    assert again["shards_this_run"] == 1 and again["rows_this_run"] == 40 and again["shards"] == 3
    assert sorted(read_stage(stage, "shards", ["key"])["key"]) == keys_before
    assert (stage / "_source/urls.parquet").stat().st_mtime_ns == urls_mtime  # the demo set was not regenerated
    assert again["by_status"] == first["metrics"]["by_status"]
    assert not (stage / "_img2dataset").exists() or not any((stage / "_img2dataset").iterdir())

    # a shard that keeps failing is retried, then the stage fails naming it; the other shards are kept
    plan_input = stage / "_shards_in/00002.arrow"
    good = plan_input.read_bytes()
    plan_input.write_bytes(b"not an arrow file")
    (stage / MANIFEST).unlink()
    (stage / "shards/00002.parquet").unlink()
    with pytest.raises(RunFailed):
        run_workflow(wf, select(wf))
    error = json.loads((stage / "_FAILED.json").read_text())["error"]
    assert "1 of 3 shards failed after 3 tries: 00002" in error
    assert sorted(p.name for p in (stage / "shards").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    plan_input.write_bytes(good)
    run_workflow(wf, select(wf))
    assert sorted(read_stage(stage, "shards", ["key"])["key"]) == keys_before


def jpeg_with_orientation(size, orientation: int) -> bytes:
    """A JPEG stored as `size` whose EXIF says to show it rotated: left half red, right half blue."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_a_url_list_with_bad_bytes_and_lines_keeps_every_row_and_puts_photos_upright(ray_session, tmp_path):
    from pipelines.demo_shapes import serve

    site = tmp_path / "site"
    site.mkdir()
    (site / "rotated.jpg").write_bytes(jpeg_with_orientation((80, 40), 6))  # shown 40 wide, 80 high
    (site / "plain.jpg").write_bytes(jpeg_with_orientation((64, 48), 1))
    data = tmp_path / "datasets"
    data.mkdir()
    with serve(site) as base:
        lines = [
            f"{base}/rotated.jpg\ta photo taken sideways\t0".encode(),
            f"{base}/plain.jpg\tcaf\xe9 au lait\t".encode("latin-1"),  # not UTF-8: kept, replaced, flagged
            f"{base}/plain.jpg\tturned a quarter by its list\t90".encode(),  # Open Images' Rotation: counterclockwise
            f"{base}/missing.jpg\ta 404\t0".encode(),
            b"http://x/\xff\xfe.jpg\ta URL that is not UTF-8\t0",
            b"a line\twith four\tcolumns\t0",  # malformed for a three-column list
        ]
        (data / "list.tsv").write_bytes(b"\n".join(lines) + b"\n")
        (data / "web.yaml").write_text(yaml.safe_dump({
            "name": "web", "source": "url_list", "description": "a CC12M-style list", "license": "test",
            "url_list": "list.tsv", "list_origin": "the test", "input_format": "tsv", "column_names": ["url", "caption", "turn"],
            "url_col": "url", "caption_col": "caption", "save_additional_columns": ["turn"], "rotation_col": "turn",
            "allow_private_addresses": True}))  # the test's server is on loopback
        doc = {"run_dir": "runs", "datasets_dir": "datasets", "datasets": ["web"],
               "stages": {"download": {"uses": "download", "config": {"dataset": "web", "timeout": 5, "encode_format": "jpg"},
                                       "resources": {"cpus": 0.5, "concurrency": 2}}}}
        path = tmp_path / "workflow.yaml"
        path.write_text(yaml.safe_dump(doc))
        wf = load_workflow(path)
        run_workflow(wf, select(wf))
    rows = read_stage(wf.stage_dir("download"), "shards")
    assert len(rows) == 6 and rows["key"].is_unique
    by_caption = {c: r for c, (_, r) in zip(rows["caption"], rows.iterrows())}
    upright = Image.open(io.BytesIO(by_caption["a photo taken sideways"]["image"]))
    assert upright.size == (40, 80)
    top, bottom = upright.getpixel((20, 5)), upright.getpixel((20, 75))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after the quarter turn
    latte = by_caption["caf\ufffd au lait"]
    assert latte["status"] == "success" and json.loads(latte["extra"])["caption_invalid_utf8"] is True
    turned = by_caption["turned a quarter by its list"]
    im = Image.open(io.BytesIO(turned["image"]))
    assert im.size == (48, 64) == (turned["width"], turned["height"]) and json.loads(turned["extra"])["rotated"] == 90
    top, bottom = im.getpixel((24, 5)), im.getpixel((24, 59))
    assert top[2] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[2] < 60  # the left (red) half went down
    assert by_caption["a 404"]["reason"] == "http_404"
    assert by_caption["a URL that is not UTF-8"]["reason"] == "invalid_utf8_url"
    malformed = rows[rows["reason"] == "malformed_line"]
    assert len(malformed) == 1 and "with four" in malformed["error_message"].iloc[0]
    metrics = manifest_of(wf.stage_dir("download"))["metrics"]
    assert metrics["input_rows"] == 6 and metrics["read_problems"] == {
        "caption_invalid_utf8": 1, "invalid_utf8_url": 1, "malformed_line": 1}


def png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_local_archives_are_ingested_with_captions_and_failures(ray_session, tmp_path):
    data = tmp_path / "datasets/data"  # paths in a manifest are relative to its folder
    data.mkdir(parents=True)
    with tarfile.open(data / "000.tgz", "w:gz") as tar:
        add(tar, "000/a.png", png((255, 0, 0), (80, 64)))
        add(tar, "000/b.png", png((0, 255, 0), (64, 64)))
        add(tar, "000/b.json", b"{}")  # not an image member: skipped
        add(tar, "000/broken.png", b"\x89PNG not really")
    with tarfile.open(data / "001.tar", "w") as tar:
        add(tar, "001/c.png", png((0, 0, 255), (40, 100)))
        add(tar, "001/d.png", png((9, 9, 9), (128, 96)))
    (data / "003.tar").write_bytes(b"not a tar archive at all" * 40)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "004/e.png", png((1, 2, 3), (70, 70)))
        add(tar, "004/f.png", bytes(range(256)) * 8)
    (data / "004.tar").write_bytes(buf.getvalue()[: 512 * 3 + 1000])  # cut inside f.png's data
    records = [
        {"img_path": "./000/a.png", "prompt": "red", "Task2": {"Caption": "a red square"}},
        {"img_path": "./000/b.png", "prompt": "green", "Task2": {"Caption": "a green square"}},
        {"img_path": "./001/c.png", "prompt": "blue", "Task2": {"Caption": "a blue bar"}},
    ]
    (data / "anno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "links.txt").write_text("file_name\tcdn_link\n000.tgz\thttps://x/0\n001.tar\thttps://x/1\n002.tar\thttps://x/2\n")
    (tmp_path / "datasets/jdb.yaml").write_text(yaml.safe_dump({
        "name": "jdb", "source": "archives", "description": "JourneyDB-like", "license": "test",
        "archives": "data/*.t[ag][rz]", "links_file": "data/links.txt", "image_extensions": [".png"],
        "captions": {"path": "data/anno.jsonl", "format": "jsonl", "key_field": "img_path", "caption_field": "Task2.Caption", "match": "path"},
    }))
    doc = {
        "run_dir": "runs", "datasets_dir": "datasets", "datasets": ["jdb"],
        "stages": {
            "ingest": {"uses": "download", "config": {"dataset": "jdb"}, "resources": {"cpus": 0.5, "concurrency": 2}},
            "filter": {"uses": "filter", "needs": ["ingest"], "config": {"min_short_edge": 64}},
        },
    }
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(doc))
    wf = load_workflow(path)
    run_workflow(wf, select(wf))

    rows = read_stage(wf.stage_dir("ingest"), "shards").set_index("url")
    assert len(rows) == 8 and rows["key"].is_unique
    shards = sorted(p.name for p in (wf.stage_dir("ingest") / "shards").glob("*.parquet"))
    assert shards == ["000.parquet", "001.parquet", "003.parquet", "004.parquet"]
    truncated = rows[rows["key"].str.contains("truncated")]
    assert len(truncated) == 1 and truncated["reason"].iloc[0] == "truncated_archive"
    bad_archive = rows.loc[f"file://{data / '003.tar'}"]
    assert bad_archive["status"] == "failed_to_read" and bad_archive["reason"] == "bad_archive" and bad_archive["image"] is None
    by_member = {u.split("#")[1]: r for u, r in rows.iterrows() if "#" in u}
    assert by_member["000/a.png"]["caption"] == "a red square" and by_member["000/a.png"]["width"] == 80
    assert by_member["001/d.png"]["caption"] is None  # no annotation: left for recaption
    broken = by_member["000/broken.png"]
    assert broken["status"] == "failed_to_decode" and broken["reason"] == "undecodable" and broken["image"] is None
    metrics = manifest_of(wf.stage_dir("ingest"))["metrics"]
    assert metrics["archives"] == 4 and metrics["archives_missing"] == 1 and metrics["archives_missing_names"] == ["002.tar"]
    assert metrics["by_status"] == {"failed_to_decode": 1, "failed_to_read": 2, "success": 5}

    kept = read_stage(wf.stage_dir("filter"), "shards")
    assert sorted(kept["url"].str.split("#").str[1]) == ["000/a.png", "000/b.png", "001/d.png", "004/e.png"]
    rejected = read_stage(wf.stage_dir("filter"), "rejected").set_index("key")
    assert sorted(rejected["reason"]) == ["download:bad_archive", "download:truncated_archive", "download:undecodable", "too_small"]
    first = next(o["path"] for o in manifest_of(wf.stage_dir("filter"))["outputs"] if o["path"].endswith(".parquet"))
    assert pq.read_schema(wf.stage_dir("filter") / first).names[0] == "key"


    # a re-downloaded archive (here: 001.tar, now with a third image) refreshes the stage in place: only that
    # archive is ingested again, the others' shards are kept as they are, and the filter after it reruns
    kept_000 = (wf.stage_dir("ingest") / "shards/000.parquet").stat().st_mtime_ns
    with tarfile.open(data / "001.tar", "w") as tar:
        add(tar, "001/c.png", png((0, 0, 255), (40, 100)))
        add(tar, "001/d.png", png((9, 9, 9), (128, 96)))
        add(tar, "001/g.png", png((200, 200, 0), (96, 96)))
    st = workflow_status(wf)["ingest"]
    assert st.state == "stale" and st.refresh and st.reasons == [f"source 001.tar changed ({metrics_bytes(data / '001.tar', wf)})"]
    run_workflow(wf, select(wf))
    again = manifest_of(wf.stage_dir("ingest"))["metrics"]
    assert again["archives_ingested_this_run"] == 1 and again["by_status"]["success"] == 6
    assert (wf.stage_dir("ingest") / "shards/000.parquet").stat().st_mtime_ns == kept_000
    assert "001/g.png" in set(read_stage(wf.stage_dir("filter"), "shards")["url"].str.split("#").str[1])
    assert {n: s.state for n, s in workflow_status(wf).items()} == {"ingest": "done", "filter": "done"}


def metrics_bytes(archive, wf) -> str:
    """`old -> new bytes` of an archive, the old size as the ingest's manifest recorded it."""
    recorded = manifest_of(wf.stage_dir("ingest"))["sources"][str(archive)][0]
    return f"{recorded} -> {archive.stat().st_size} bytes"
