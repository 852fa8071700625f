"""The production data path rehearsed on CPU: the four release formats (pipelines/rehearsal.py), ~1,500 rows,
served on loopback with faults, through download -> filter -> recaption -> tokenize, with the driver
SIGKILLed during the downloads and run again. Every input row ends exactly once, kept or rejected with a
reason, and every image comes out upright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import rehearsal
from pipelines_support import ROOT, manifest_of, read_stage

ROWS = 1500
SOURCES = ("r_cc12m", "r_megalith", "r_sa1b", "r_journeydb")


def workflow(folder: Path) -> Path:
    shipped = yaml.safe_load((ROOT / "workflow.yaml").read_text())["stages"]
    recaption = dict(shipped["recaption"]["config"], batch_size=16, rows_per_part=128)
    stages = {f"download_{s[2:]}": {"uses": "download", "resources": {"cpus": 0.5, "concurrency": 2},
                                   "config": {"dataset": s, "number_sample_per_shard": 100, "timeout": 2, "thread_count": 16,
                                              "max_shard_retry": 1}}
              for s in SOURCES}
    stages["filter"] = {"uses": "filter", "needs": list(stages), "config": {"min_short_edge": 256, "max_aspect_ratio": 3.0},
                        "resources": {"cpus": 1, "concurrency": 2}}
    stages["recaption"] = {"uses": "recaption", "needs": ["filter"], "config": recaption, "resources": {"cpus": 0.75, "concurrency": 2}}
    stages["tokenize"] = {"uses": "tokenize", "needs": ["recaption"], "resources": {"cpus": 0.75, "concurrency": 2},
                          "config": {"tokenizer": {"kind": "pixel-fsq", "levels": 10, "downsample": 16, "device": "cpu"},
                                     "resolutions": [{"size": 256}], "batch_size": 64, "rows_per_part": 256}}
    doc = {"run_dir": "runs", "datasets_dir": "sources/datasets", "datasets": list(SOURCES), "stages": stages}
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def rehearsed(ray_head, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rehearsal")
    sources = folder / "sources"
    layout = rehearsal.generate(sources, rows=ROWS)
    rehearsal.write_manifests(sources)
    path = workflow(folder)
    env = {**os.environ, "RAY_ADDRESS": ray_head.address, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "simplear", "run", str(path)]
    runs = folder / "runs"
    with rehearsal.serve(sources) as base:
        rehearsal.write_lists(sources, base)
        with open(folder / "killed.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 180
            while not list((runs / "download_cc12m" / "shards").glob("*.parquet")):
                assert proc.poll() is None and time.time() < deadline, (folder / "killed.log").read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert not (runs / "download_cc12m" / "_MANIFEST.json").exists(), "the downloads finished before the kill"
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    return runs, sources, layout


def keys(stage_dir: Path, folder: str) -> list[str]:
    return list(read_stage(stage_dir, folder, ["key"])["key"])


def test_every_input_row_ends_exactly_once_kept_or_rejected(rehearsed):
    runs, sources, layout = rehearsed
    listed = len((sources / "cc12m.tsv").read_bytes().splitlines())
    expected = {"download_cc12m": listed, "download_megalith": pq.ParquetFile(sources / "megalith.parquet").metadata.num_rows,
                "download_sa1b": layout["sa1b"], "download_journeydb": layout["journeydb"]}
    downloaded: list[str] = []
    for stage, n in expected.items():
        rows = read_stage(runs / stage, "shards", ["key", "status", "reason"])
        assert len(rows) == n, stage
        assert rows["reason"].notna().sum() == (rows["status"] != "success").sum(), stage  # every failure has a reason
        downloaded += list(rows["key"])
    assert len(set(downloaded)) == len(downloaded)
    kept, rejected = keys(runs / "filter", "shards"), keys(runs / "filter", "rejected")
    assert sorted(kept + rejected) == sorted(downloaded)
    captioned, not_captioned = keys(runs / "recaption", "shards"), keys(runs / "recaption", "rejected")
    assert sorted(captioned + not_captioned) == sorted(kept)
    tokenized = read_stage(runs / "tokenize", "256", ["key"])["key"]
    tok_rejected = keys(runs / "tokenize", "rejected")
    assert sorted(list(tokenized) + tok_rejected) == sorted(captioned) and len(tokenized) > 0.7 * len(captioned)


def test_faults_and_bad_bytes_become_reasons(rehearsed):
    runs, sources, _ = rehearsed
    web = read_stage(runs / "download_cc12m", "shards", ["reason", "extra", "caption", "url", "status"])
    reasons = web["reason"].value_counts().to_dict()
    print(f"\ncc12m-style reasons: {reasons}")
    for reason in ("http_404", "http_500", "timeout", "empty_file", "truncated", "invalid_utf8_url", "malformed_line"):
        assert reasons.get(reason, 0) >= 1, reasons
    for fault in ("truncated", "empty"):  # a cut or empty body is a failure with a reason, never an image
        hit = web[web["url"].str.contains(f"/fault/{fault}/", regex=False)]
        assert len(hit) and (hit["status"] != "success").all() and hit["reason"].notna().all(), (fault, hit)
    hostile = {"/fault/metadata/": "blocked_address", "/fault/file/": "unsupported_scheme", "/fault/huge/": "too_large",
               f"file://{(sources / rehearsal.SECRET).resolve()}": "unsupported_scheme"}
    for url, reason in hostile.items():  # the manifest's opt-in lets loopback through, never these
        hit = web[web["url"].str.contains(url, regex=False)]
        assert len(hit) and (hit["reason"] == reason).all(), (url, hit[["status", "reason"]])
    slow = web[web["url"].str.contains("/fault/slow/", regex=False)]
    assert len(slow) and (slow["status"] == "success").all()  # slow but within the timeout: downloaded
    flagged = web[web["extra"].fillna("").str.contains("caption_invalid_utf8")]
    assert len(flagged) >= 5 and flagged["caption"].str.contains("\ufffd").all()
    megalith = read_stage(runs / "download_megalith", "shards", ["status"])
    assert (megalith["status"] == "success").mean() > 0.9  # url_highres was used: the small URLs all 404
    sa = read_stage(runs / "download_sa1b", "shards", ["caption", "status"])
    assert (sa["status"] == "success").all() and 0.85 < sa["caption"].notna().mean() < 0.95  # one in ten uncaptioned
    jdb = read_stage(runs / "download_journeydb", "shards", ["caption"])
    assert jdb["caption"].notna().all()  # the malformed annotation line cost no image its caption


def test_every_image_is_upright_rotated_ones_included(rehearsed):
    import io

    from PIL import Image

    runs, _, layout = rehearsed
    assert sum(i["orientation"] != 1 for i in layout["images"]) >= 10
    checked = 0
    for stage in ("download_cc12m", "download_megalith", "download_sa1b", "download_journeydb"):
        for m in [manifest_of(runs / stage)]:
            for o in m["outputs"]:
                if not o["path"].endswith(".parquet"):
                    continue
                t = pq.read_table(runs / stage / o["path"], columns=["status", "image", "url"]).to_pylist()
                for r in t:
                    if r["status"] == "success" and "/fault/" not in (r["url"] or ""):
                        assert rehearsal.is_upright(Image.open(io.BytesIO(r["image"]))), (stage, r["url"])
                        checked += 1
    assert checked > 1000


def test_the_kill_lost_nothing_and_the_rerun_redid_only_what_was_missing(rehearsed):
    runs, _, _ = rehearsed
    m = manifest_of(runs / "download_cc12m")["metrics"]
    assert 1 <= m["shards_this_run"] < m["shards"]
    assert json.loads((runs / "download_cc12m" / "_shards_in" / "_PLAN.json").read_text())["shards"] == m["shards"]
