"""Names that become paths stay inside the run: workflow names are checked, benchmark ids mapped, and every commit
of a run refuses a path outside its run dir."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pydantic import ValidationError

from simplear.config import ConfigError
from simplear.evaluation.config import CheckpointSpec, PromptSetSpec
from simplear.evaluation.generate import SetPlace, grid_rel, write_prompt
from simplear.scorers import EvalItem
from simplear.workflow.lock import FENCE_ENV, OutsideRun
from simplear.workflow.manifest import atomic_path
from simplear.workflow.names import check_name, file_name
from simplear.workflow.spec import load_workflow
from test_workflow_spec import BASE, write

BAD = ["../../x", "..", ".previous", "/etc/x", "a/b", "a\\b", "", "x" * 129, "-flag", "a\x00b", "ok name"]


@pytest.mark.parametrize("bad", BAD)
def test_a_stage_or_dataset_name_that_is_no_safe_folder_is_refused_before_any_work(tmp_path, bad):
    doc = {**BASE, "stages": {**BASE["stages"], bad: {"uses": "test_shards"}}}
    assert "cannot name a folder or file" in str(pytest.raises(ConfigError, load_workflow, write(tmp_path, doc)).value)
    doc = {**BASE, "datasets": [bad]}
    assert "cannot name a folder or file" in str(pytest.raises(ConfigError, load_workflow, write(tmp_path, doc)).value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad", BAD)
def test_checkpoint_and_prompt_set_names_must_be_safe_folders(bad):
    with pytest.raises(ValidationError):
        CheckpointSpec(stage="sft", name=bad)
    with pytest.raises(ValidationError):
        PromptSetSpec(name=bad, source="list", items=["a"], scorers=[{"kind": "shapes"}])


def test_safe_names_pass_unchanged():
    for ok in ("tokenize_512", "sft", "SimpleAR-0.5B-RL", "partiprompts12", "COCOval2014000000123456", "v1.2"):
        assert check_name(ok, "name") == ok and file_name(ok) == ok


def test_benchmark_ids_become_distinct_safe_file_names():
    names = {file_name(i) for i in ("../../x", "..\\..\\x", "/x", "x/..", ".x", "x")}
    assert len(names) == 6
    assert all(check_name(n, "id") for n in names)


def test_a_dpg_item_id_cannot_write_outside_the_set_folder(tmp_path):
    folder = tmp_path / "run" / "eval" / "images" / "sft" / "dpg"
    item = EvalItem(prompt="p", id="../../../../x", metadata={"item_id": "../../../../x"})
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue", "white")]
    entries = write_prompt(SetPlace(str(tmp_path / "run"), "eval", "images/sft/dpg"), 0, item, images, grid=True)
    grid = folder / grid_rel(item)
    assert grid.parent == folder / "grids" and grid.exists()
    assert f"images/sft/dpg/{grid_rel(item)}" in entries
    assert [p for p in tmp_path.rglob("*.png") if not p.is_relative_to(folder)] == []


def test_every_commit_of_a_run_stays_inside_its_run_dir(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "stage").mkdir(parents=True)
    (run_dir / "stage" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    monkeypatch.setenv(FENCE_ENV, json.dumps({"run": str(run_dir), "run_id": "r"}))
    (run_dir / "_LOCK.json").write_text(json.dumps({"run_id": "r"}))
    with atomic_path(run_dir / "stage" / "ok.txt") as tmp:
        tmp.write_text("ok")
    for outside in (run_dir / "stage" / ".." / ".." / "x.txt", tmp_path / "y.txt", run_dir / "stage" / "link" / "z.txt"):
        with pytest.raises(OutsideRun, match="outside the run dir"):
            with atomic_path(outside) as tmp:
                tmp.write_text("no")
    assert (run_dir / "stage" / "ok.txt").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing made outside, not even a folder
