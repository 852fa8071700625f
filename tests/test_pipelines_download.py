"""download on its own: a rerun fetches only the missing shards; local archives (SA-1B / JourneyDB layout) are ingested."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipelines_support import data_workflow, manifest_of, read_stage
from simplear.workflow.engine import run_workflow, select
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

    # what a kill during shard 1 leaves: no manifest, no converted shard, no img2dataset completion marker
    (stage / MANIFEST).unlink()
    (stage / "shards/00001.parquet").unlink()
    (stage / "_img2dataset/00001_stats.json").unlink()
    statuses = run_workflow(wf, select(wf))
    assert statuses["download"].state == "done"
    again = manifest_of(stage)["metrics"]
    assert again["shards_this_run"] == 1 and again["rows_this_run"] == 40 and again["shards"] == 3
    assert sorted(read_stage(stage, "shards", ["key"])["key"]) == keys_before
    assert (stage / "_source/urls.parquet").stat().st_mtime_ns == urls_mtime  # the demo set was not regenerated
    assert again["by_status"] == first["metrics"]["by_status"]


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
    assert pq.read_schema(wf.stage_dir("filter") / manifest_of(wf.stage_dir("filter"))["outputs"][0]["path"]).names[0] == "key"

