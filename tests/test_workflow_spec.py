"""workflow.yaml validation: every rule fails before any work, naming the file and the key."""

from pathlib import Path

import pytest
import yaml

from simplear.config import ConfigError
from simplear.workflow.spec import deep_merge, load_workflow

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, doc: dict, name="workflow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


BASE = {
    "plugins": ["stage_kinds"],
    "stages": {
        "a": {"uses": "test_shards"},
        "b": {"uses": "test_shards", "needs": ["a"], "config": {"shards": 2}},
    },
}


def error_of(path, profile=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_workflow(path, profile)
    return str(e.value)


def test_valid_workflow_resolves_in_topological_order(tmp_path):
    doc = {**BASE, "stages": {"b": BASE["stages"]["b"], "a": BASE["stages"]["a"]}}
    wf = load_workflow(write(tmp_path, doc))
    assert list(wf.stages) == ["a", "b"]
    assert wf.stages["b"].config.shards == 2
    assert wf.run_dir == (tmp_path / "runs/default").resolve()


def test_unknown_top_level_key_names_file_and_key(tmp_path):
    path = write(tmp_path, {**BASE, "run_dri": "x"})
    msg = error_of(path)
    assert str(path) in msg and "run_dri: unknown key" in msg


def test_unknown_stage_key_and_resources_key(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "test_shards", "nedds": [], "resources": {"gpu": 1}}}}
    msg = error_of(write(tmp_path, doc))
    assert "stages.a.nedds: unknown key" in msg
    assert "stages.a.resources.gpu: unknown key" in msg


def test_unknown_config_key_names_the_path(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "test_shards", "config": {"shardz": 3}}}}
    assert "stages.a.config.shardz: unknown key" in error_of(write(tmp_path, doc))


def test_bad_config_value_names_the_path(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "test_shards", "config": {"shards": "many"}}}}
    assert "stages.a.config.shards:" in error_of(write(tmp_path, doc))


def test_unknown_stage_kind(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "no_such_kind"}}}
    msg = error_of(write(tmp_path, doc))
    assert "stages.a.uses: unknown stage kind 'no_such_kind'" in msg and "test_shards" in msg


def test_unknown_need(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "test_shards", "needs": ["ghost"]}}}
    assert "stages.a.needs: unknown stage 'ghost'" in error_of(write(tmp_path, doc))


def test_cycle_is_reported_with_its_path(tmp_path):
    doc = {
        **BASE,
        "stages": {
            "a": {"uses": "test_shards", "needs": ["c"]},
            "b": {"uses": "test_shards", "needs": ["a"]},
            "c": {"uses": "test_shards", "needs": ["b"]},
        },
    }
    msg = error_of(write(tmp_path, doc))
    assert "cycle" in msg and "a -> c -> b -> a" in msg


def test_missing_dataset(tmp_path):
    (tmp_path / "datasets_manifest").mkdir()
    (tmp_path / "datasets_manifest" / "known.yaml").write_text("name: known\n")
    msg = error_of(write(tmp_path, {**BASE, "datasets": ["known", "nowhere"]}))
    assert "datasets.1: unknown dataset 'nowhere'" in msg and "known: known" in msg


def test_unknown_profile(tmp_path):
    msg = error_of(write(tmp_path, {**BASE, "profiles": {"demo": {}}}), "prod")
    assert "unknown profile 'prod'" in msg and "demo" in msg


def test_profile_overrides_merge_and_null_removes(tmp_path):
    doc = {
        **BASE,
        "profiles": {
            "demo": {"stages": {"b": {"config": {"shards": 5}}}},
            "small": {"run_dir": "elsewhere", "stages": {"b": None}},
        },
    }
    path = write(tmp_path, doc)
    demo = load_workflow(path)  # demo is the default profile
    assert demo.profile == "demo" and demo.stages["b"].config.shards == 5 and demo.stages["b"].needs == ["a"]
    small = load_workflow(path, "small")
    assert list(small.stages) == ["a"] and small.run_dir == (tmp_path / "elsewhere").resolve()


def test_profile_error_names_the_profile(tmp_path):
    doc = {**BASE, "profiles": {"demo": {"stages": {"a": {"config": {"bogus": 1}}}}}}
    msg = error_of(write(tmp_path, doc))
    assert "(profile demo)" in msg and "stages.a.config.bogus: unknown key" in msg


def test_every_problem_is_listed_at_once(tmp_path):
    doc = {**BASE, "stages": {"a": {"uses": "nope"}, "b": {"uses": "test_shards", "config": {"x": 1}}}}
    msg = error_of(write(tmp_path, doc))
    assert "stages.a.uses" in msg and "stages.b.config.x: unknown key" in msg


def test_deep_merge_does_not_touch_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    merged = deep_merge(base, {"a": {"b": 2, "d": 3}})
    assert merged == {"a": {"b": 2, "c": [1], "d": 3}} and base == {"a": {"b": 1, "c": [1]}}


@pytest.mark.parametrize("profile", ["demo", "production"])
def test_shipped_workflow_profiles_load(profile):
    wf = load_workflow(ROOT / "workflow.yaml", profile)
    assert wf.profile == profile
    for stage in wf.stages.values():
        assert stage.kind.name == stage.spec.uses
