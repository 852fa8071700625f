"""The download stage on a run dir on object storage (tests/s3_server.py): a URL list served on loopback and local
archives give the outputs they give on a local run dir, byte for byte; a rerun skips without writing; a stage cut
short after some shards resumes without writing its finished shards again."""

from __future__ import annotations

import tarfile

import pytest
import yaml

from pipelines.demo_shapes import serve
from simplear.storage import join
from simplear.workflow.engine import plan, run_workflow, select
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow
from test_pipelines_download import add, jpeg_with_orientation, png
from test_s3_run_dir import on_s3

STAGE = "download"


def url_list(folder, base: str) -> dict:
    """Images on the test's loopback server, one sideways, one missing: three shards of up to three rows."""
    site = folder / "site"
    site.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 200, 0)]):
        (site / f"{i}.png").write_bytes(png(colour, (48 + 8 * i, 40)))
    (site / "sideways.jpg").write_bytes(jpeg_with_orientation((80, 40), 6))
    lines = [f"{base}/site/{i}.png\timage {i}" for i in range(5)] + [f"{base}/site/sideways.jpg\tsideways",
                                                                    f"{base}/site/missing.png\ta 404"]
    (folder / "datasets/list.tsv").write_text("\n".join(lines) + "\n")
    return {"source": "url_list", "url_list": "list.tsv", "list_origin": "the test", "input_format": "tsv",
            "column_names": ["url", "caption"], "url_col": "url", "caption_col": "caption",
            "allow_private_addresses": True}  # the test's server is on loopback


def archives(folder, base: str) -> dict:
    """Three local archives (one cut short) with a caption file beside them."""
    data = folder / "datasets/data"
    data.mkdir()
    for n in range(3):
        with tarfile.open(data / f"00{n}.tar", "w") as tar:
            for k in range(2):
                add(tar, f"{n}/{k}.png", png((40 * n, 80 * k, 90), (64 + 8 * k, 64)))
    (data / "002.tar").write_bytes((data / "002.tar").read_bytes()[:512 + 40])  # cut inside its first image
    (data / "captions.tsv").write_text("key\tcaption\n0.png\tthe first\n1.png\tthe second\n")
    return {"source": "archives", "archives": "data/*.tar", "image_extensions": [".png"],
            "captions": {"path": "data/captions.tsv", "format": "tsv", "key_field": "key", "caption_field": "caption"}}


def workflows(folder, source: dict, run_dir: str):
    """(local, s3) workflows of one download of `source`, the same but for their run dir."""
    (folder / "datasets/web.yaml").write_text(yaml.safe_dump({"name": "web", "description": "test", "license": "test",
                                                              **source}))
    doc = {"run_dir": "runs", "datasets_dir": "datasets", "datasets": ["web"],
           "stages": {STAGE: {"uses": "download", "config": {"dataset": "web", "timeout": 5, "number_sample_per_shard": 3},
                              "resources": {"cpus": 0.5, "concurrency": 2}}}}
    for name in ("local", "s3"):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return load_workflow(folder / "local.yaml"), load_workflow(on_s3(folder / "s3.yaml", run_dir))


def manifest(wf) -> dict:
    return wf.store.read_json(join(STAGE, MANIFEST))


def written(s3_server, bucket: str) -> set[str]:
    """The stage's keys written since the last reset (whole PUTs and multipart parts alike)."""
    prefix = f"/{bucket}/{STAGE}/"
    return {path[len(prefix):] for op, path, _ in s3_server.requests() if op in ("PUT", "POST") and path.startswith(prefix)}


@pytest.mark.parametrize("make_source", [url_list, archives])
def test_a_download_on_s3_matches_a_local_one_skips_and_resumes(ray_session, s3_server, tmp_path, make_source):
    bucket = f"download-{make_source.__name__.replace('_', '-')}"
    (tmp_path / "datasets").mkdir()
    with serve(tmp_path) as base:
        local, s3 = workflows(tmp_path, make_source(tmp_path, base), s3_server.bucket(bucket))
        run_workflow(local, select(local))
        run_workflow(s3, select(s3))
        expected = manifest(local)
        shards = [o["path"] for o in expected["outputs"]]
        assert len(shards) == 3 and all(o["sha256"] for o in expected["outputs"])
        done = manifest(s3)
        assert done["outputs"] == expected["outputs"] and done["rows"] == expected["rows"] > 0
        assert done["metrics"]["by_status"] == expected["metrics"]["by_status"]
        assert not list(tmp_path.glob("s3:*"))

        # up to date: planned as a skip, and the rerun writes nothing in the stage
        assert [action for _, _, action in plan(s3, select(s3))] == ["skip"]
        s3_server.reset_requests()
        run_workflow(s3, select(s3))
        assert written(s3_server, bucket) == set()

        # what a kill after the first shards leaves (no manifest, the last shard missing): only that shard is redone
        s3.store.delete(join(STAGE, MANIFEST))
        s3.store.delete(join(STAGE, shards[-1]))
        s3_server.reset_requests()
        run_workflow(s3, select(s3))
        print("WRITTEN", sorted(written(s3_server, bucket)))
        print("EXPECTED", expected["outputs"], expected["metrics"]["by_status"], expected["metrics"].get("shards_this_run"))
        print("RESUMED", manifest(s3)["metrics"])
        resumed = manifest(s3)
        assert resumed["outputs"] == expected["outputs"]
        assert resumed["metrics"]["rows_this_run"] == expected["outputs"][-1]["rows"]
