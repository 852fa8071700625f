"""The demo data chain (download -> filter -> recaption -> tokenize) on a small demo set, on the session's Ray cluster.

The module's run is itself the kill-and-resume test: `simplear run` (a driver attached by RAY_ADDRESS)
is SIGKILLed once recaption has finished some of its sources, then run again; every other test checks
the resumed outputs, so a lost or duplicated key anywhere fails them too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import attach_ray
from pipelines import demo_shapes
from pipelines.pixels import PIXELS_JSON, fetch
from pipelines.resumable_parquet import RECEIPTS, read_receipts, input_sources
from pipelines_support import ROOT, data_workflow, manifest_of, read_stage
from simplear.storage.local import LocalStore
from simplear.visual_tokenizers import load_visual_tokenizer
from simplear.workflow.engine import run_workflow, select, workflow_status
from simplear.workflow.manifest import MANIFEST
from simplear.workflow.spec import load_workflow

COUNT = 150  # + 14 broken entries
BROKEN_REASON = {"missing": "http_404", "zero_byte": "empty_file", "huge_header": "too_large",
                 "not_an_image": "undecodable", "truncated": "undecodable"}


@dataclass
class Demo:
    path: Path
    runs: Path
    done_at_kill: dict[str, float]  # receipt file -> mtime, for recaption sources finished before the kill
    receipts_at_kill: int
    consoles: list[str]  # what the killed run and the resumed one printed (a driver attached with log_to_driver)


def _cluster_workers(head, names: tuple[str, ...]) -> list[psutil.Process]:
    """Worker processes of this test session's cluster whose title contains one of `names`."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(head.temp_dir in a for a in p.info["cmdline"] or []):
                for c in p.children(recursive=True):
                    title = " ".join(c.cmdline())
                    if any(n in title for n in names):
                        found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(found.values())


def _finished_sources(stage_dir: Path, sources) -> set[str]:
    receipts = read_receipts(LocalStore(stage_dir.parent), stage_dir.name)
    return {s.id for s in sources if s.id in receipts and sum(d["rows"] for _, d in receipts[s.id]) == s.rows}


@pytest.fixture(scope="module")
def demo(ray_head, tmp_path_factory) -> Demo:
    attach_ray(ray_head)
    folder = tmp_path_factory.mktemp("demo")
    path = data_workflow(folder, count=COUNT, stages={
        "download": {"config": {"number_sample_per_shard": 60}},  # 3 shards: 3 sources for every later stage
        "recaption": {"config": {"batch_size": 6, "rows_per_part": 24, "max_new_tokens_long": 32}},  # slow enough to kill
    })
    runs = folder / "runs"
    env = {**os.environ, "RAY_ADDRESS": ray_head.address, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "simplear.cli", "run", str(path)]
    log = open(folder / "killed_run.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    recaption = runs / "recaption"
    deadline = time.time() + 300
    sources = None
    while True:
        assert proc.poll() is None and time.time() < deadline, f"no recaption progress to kill; see {folder / 'killed_run.log'}"
        if sources is None and (runs / "filter" / MANIFEST).exists():
            sources = input_sources(_Ctx(runs, ["filter"]))
        if sources and _finished_sources(recaption, sources):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Ray ends a dead driver's tasks and actors; wait until they are gone before resuming
    psutil.wait_procs(_cluster_workers(ray_head, ("stage:recaption", "Recaptioner")), timeout=60)
    assert not (recaption / MANIFEST).exists(), "recaption finished before the kill: make it slower"
    done = _finished_sources(recaption, sources)
    assert 1 <= len(done) < len(sources)
    done_at_kill = {str(f): f.stat().st_mtime for sid in done for f in (recaption / RECEIPTS / sid).glob("*.json")}
    receipts_at_kill = len(list((recaption / RECEIPTS).glob("*/*.json")))

    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    log.close()
    consoles = [(folder / "killed_run.log").read_text(), out.stdout + out.stderr]
    return Demo(path=path, runs=runs, done_at_kill=done_at_kill, receipts_at_kill=receipts_at_kill, consoles=consoles)


@dataclass
class _Ctx:
    """Just enough of a StageContext for `input_sources`."""

    run_dir: Path
    needs: list[str]

    def input_path(self, need, rel):
        return self.run_dir / need / rel

    def input_manifest(self, need):
        return json.loads((self.run_dir / need / MANIFEST).read_text())


def test_killed_recaption_resumed_without_losing_or_duplicating_a_key(demo):
    recaption = demo.runs / "recaption"
    for receipt, mtime in demo.done_at_kill.items():
        assert Path(receipt).stat().st_mtime == mtime, "a source finished before the kill was redone"
    kept = read_stage(demo.runs / "filter", "shards", ["key"])["key"]
    captioned = read_stage(recaption, "shards", ["key"])["key"]
    assert captioned.is_unique and sorted(captioned) == sorted(kept)
    assert manifest_of(recaption)["metrics"]["sources_done_this_run"] < manifest_of(recaption)["metrics"]["sources"]
    for res in ("64", "96", "128"):
        assert read_stage(demo.runs / "tokenize", res, ["key"])["key"].is_unique


def test_download_records_every_broken_file_with_its_reason(demo):
    rows = read_stage(demo.runs / "download", "shards")
    assert len(rows) == COUNT + 14 and rows["key"].is_unique
    assert rows["key"].str.startswith("demo_shapes-").all()
    rows["kind"] = [json.loads(x)["kind"] for x in rows["extra"]]
    ok = rows[rows["kind"] == "ok"]
    assert (ok["status"] == "success").all() and ok["image"].notna().all() and ok["reason"].isna().all()
    assert (ok["width"] == ok["original_width"]).all()  # resize_mode "no": original pixels
    for kind, reason in BROKEN_REASON.items():
        bad = rows[rows["kind"] == kind]
        assert len(bad) > 0 and set(bad["reason"]) == {reason}, (kind, set(bad["reason"]))
        assert bad["image"].isna().all() and bad["error_message"].notna().all()
    assert set(rows[rows["kind"] == "missing"]["status"]) == {"failed_to_download"}
    metrics = manifest_of(demo.runs / "download")["metrics"]
    assert metrics["failed_by_reason"] == dict(Counter(BROKEN_REASON[k] for k in rows["kind"] if k != "ok"))
    assert metrics["by_status"]["success"] == COUNT and metrics["shards"] == 3 and metrics["rows_per_s"] > 0


def test_filter_keeps_exactly_the_images_with_a_short_edge_of_64_or_more(demo):
    down = read_stage(demo.runs / "download", "shards")
    kept = read_stage(demo.runs / "filter", "shards")
    rejected = read_stage(demo.runs / "filter", "rejected")
    ok = down[down["status"] == "success"]
    big = ok[np.minimum(ok["width"], ok["height"]) >= 64]
    assert sorted(kept["key"]) == sorted(big["key"])
    assert set(kept["key"]).isdisjoint(rejected["key"]) and len(kept) + len(rejected) == len(down)
    assert "image" not in rejected and "image" not in kept  # the bytes stay in the download's shards
    by_key = dict(zip(down["key"], down["image"]))
    assert fetch(list(kept["image_file"]), list(kept["image_row"]), demo.runs) == [by_key[k] for k in kept["key"]]
    listed = json.loads((demo.runs / "filter" / PIXELS_JSON).read_text())["files"]
    assert set(kept["image_file"]) <= set(listed) and all(e["sha256"] for e in listed.values())
    assert PIXELS_JSON in {o["path"] for o in manifest_of(demo.runs / "filter")["outputs"]}
    reasons = Counter(rejected["reason"])
    assert reasons["too_small"] == len(ok) - len(big) > 0
    assert reasons["download:http_404"] == 4
    metrics = manifest_of(demo.runs / "filter")["metrics"]
    assert metrics["rows_out"] == {"shards": len(kept), "rejected": len(rejected)}
    assert metrics["by_reason"] == dict(sorted(reasons.items())) and metrics["rows_in"] == len(down)


def test_recaption_stores_long_and_short_captions_from_the_built_checkpoint(demo, ray_head):
    rows = read_stage(demo.runs / "recaption", "shards")
    assert rows["caption_long"].notna().all() and rows["caption_short"].notna().all()
    assert set(rows["caption_model"]) == {"tiny-random"}
    assert rows["caption"].map(demo_shapes.parse_caption).notna().all()  # the original captions are kept
    from transformers import AutoConfig

    built = list(Path(ray_head.temp_dir).rglob("simplear-staging/tiny-qwen2vl-*/config.json"))  # once per node
    assert built and AutoConfig.from_pretrained(built[0].parent).model_type == "qwen2_vl"
    assert not (demo.runs / "recaption" / "_model").exists()  # not in the run: every node builds the same one


def test_tokenize_writes_codes_per_resolution_for_big_enough_images(demo):
    source = read_stage(demo.runs / "recaption", "shards").set_index("key")
    short = np.minimum(source["width"], source["height"])
    info = json.loads((demo.runs / "tokenize/tokenizer.json").read_text())
    assert info["codebook_size"] == 1000 and info["downsample"] == 8
    tok = load_visual_tokenizer(info["config"])
    for size in (64, 96, 128):
        rows = read_stage(demo.runs / "tokenize", str(size))
        assert list(rows.columns) == ["key", "caption", "caption_long", "caption_short", "tokenizer", "height", "width", "codes"]
        assert sorted(rows["key"]) == sorted(short[short >= size].index)
        assert (rows["height"] == size).all() and (rows["width"] == size).all() and set(rows["tokenizer"]) == {tok.name}
        codes = np.stack(rows["codes"].to_list())
        assert codes.shape == (len(rows), (size // 8) ** 2) and codes.min() >= 0 and codes.max() < 1000
        assert info["resolutions"][str(size)]["tokens"] == codes.shape[1]
        assert (rows["caption"].to_numpy() == source.loc[rows["key"], "caption"].to_numpy()).all()
        assert (rows["caption_long"].to_numpy() == source.loc[rows["key"], "caption_long"].to_numpy()).all()
    # decoded codes show the caption's background colour
    rows = read_stage(demo.runs / "tokenize", "64")
    hits = 0
    for caption, codes in zip(rows["caption"][:30], rows["codes"][:30]):
        _, _, bg = demo_shapes.parse_caption(caption)
        img = ((tok.decode(np.asarray(codes).reshape(1, 8, 8))[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
        hits += (np.abs(corners - np.array(demo_shapes.PALETTE[bg])).max(axis=-1) < 30).any()
    assert hits >= 27


def test_every_stage_reports_rows_per_second_and_a_rerun_does_no_work(demo, ray_head):
    wf = load_workflow(demo.path)
    before = {n: manifest_of(demo.runs / n) for n in wf.stages}
    for name, m in before.items():
        assert m["metrics"]["rows_per_s"] > 0, name
    statuses = run_workflow(wf, select(wf))
    assert {n: s.state for n, s in statuses.items()} == dict.fromkeys(wf.stages, "done")
    for name in wf.stages:
        assert manifest_of(demo.runs / name)["finished_at"] == before[name]["finished_at"]
    assert {n: s.state for n, s in workflow_status(wf).items()} == dict.fromkeys(wf.stages, "done")


def test_stages_show_on_the_metrics_endpoint_by_name(demo, ray_head):
    """Per-stage counters (ray.util.metrics) and Ray Data datasets named after their stage, as Prometheus
    serves them to the dashboard, with the receipts' row counts of the resumed run."""
    def series(text: str, name: str) -> dict[str, float]:
        """This demo run's values by stage (other tests' runs on the session cluster count under their own run tag)."""
        out: dict[str, float] = {}
        for m in re.finditer(rf'^{name}{{([^}}]*)}} ([0-9.e+]+)$', text, re.M):
            stage, run = re.search(r'stage="([^"]+)"', m.group(1)), re.search(r'run="([^"]*)"', m.group(1))
            if stage and run and Path(run.group(1)).resolve() == demo.runs.resolve():
                out[stage.group(1)] = out.get(stage.group(1), 0.0) + float(m.group(2))
        return out

    deadline = time.time() + 60
    while True:
        text = ray_head.scrape()
        done = series(text, "ray_simplear_rows_done_total")
        if {"filter", "recaption", "tokenize"} <= set(done) or time.time() > deadline:
            break
        time.sleep(2)
    assert {"filter", "recaption", "tokenize"} <= set(done), sorted(set(re.findall(r"^(ray_simplear\w+)", text, re.M)))
    wf = load_workflow(demo.path)
    filtered = manifest_of(demo.runs / "filter")["metrics"]
    assert done["filter"] == filtered["rows_in"] and series(text, "ray_simplear_rows_rejected_total")["filter"] > 0
    assert done["recaption"] <= manifest_of(demo.runs / "recaption")["metrics"]["rows_in"]  # after the kill: the resumed run's share
    for stage in ("filter", "recaption", "tokenize"):
        assert re.search(rf'^ray_data_\w+{{[^}}]*dataset="{stage}@job[0-9a-f]+_', text, re.M), \
            f"no Ray Data series named {stage}@job<id>_*"
    assert set(wf.stages) >= {"filter", "recaption", "tokenize"}


def test_output_checksums_come_from_the_tasks_that_wrote_them(demo):
    """Each part's manifest entry is the one its writing task put in its receipt, and it is right."""
    from pipelines.resumable_parquet import receipt_entries
    from simplear.workflow.manifest import sha256_file

    for stage in ("filter", "recaption", "tokenize"):
        entries = receipt_entries(read_receipts(LocalStore(demo.runs), stage))
        outputs = [o for o in manifest_of(demo.runs / stage)["outputs"] if o["path"].endswith(".parquet")]
        assert outputs and all(entries[o["path"]] == o for o in outputs), stage
        assert all(sha256_file(demo.runs / stage / o["path"]) == o["sha256"] for o in outputs[:5])


# Lines a clean data run must not print: dependencies' update checks and warnings, Ray Data's per-dataset lines
CHATTER = ("albumentations", "new version", "UserWarning", "DeprecationWarning", "FutureWarning",
           "streaming_executor.py", "Reporting training result", "Progress bars disabled", "Loading weights",
           "Writing model shards")


def test_console_has_the_stages_lines_and_no_library_chatter(demo):
    """Both runs' consoles: each stage's start and its one `done` line with key figures; nothing from CHATTER."""
    for console in demo.consoles:
        noisy = [line for line in console.splitlines() if any(c.lower() in line.lower() for c in CHATTER)]
        assert not noisy, noisy[:10]
    resumed = demo.consoles[1]
    for stage in ("recaption", "tokenize"):
        assert re.search(rf"{stage}: done in [0-9.]+s: [0-9,]+ rows", resumed), stage
    assert re.search(r"filter: done in [0-9.]+s: [0-9,]+ rows kept, [0-9,]+ rejected \(", demo.consoles[0])
