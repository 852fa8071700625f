"""Dataset manifests and the data stages' configs: every shipped file loads, every mistake names its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simplear.config import ConfigError
from simplear.datasets import ArchiveSource, GeneratedSource, UrlListSource, load_all, load_dataset_manifest
from simplear.workflow.spec import load_workflow

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["cc3m", "cc12m", "megalith_10m", "openimages", "sa1b", "journeydb", "demo_shapes"]

GOOD_URL_LIST = {
    "name": "web",
    "source": "url_list",
    "description": "d",
    "license": "l",
    "url_list": "list.tsv",
    "list_origin": "somewhere",
    "input_format": "tsv",
    "url_col": "url",
    "caption_col": "caption",
}


def write(tmp_path: Path, doc, name: str = "web") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_dataset_manifest(path)
    return str(e.value)


def test_every_shipped_manifest_loads_with_the_right_kind():
    manifests = load_all(ROOT / "datasets_manifest")
    assert set(manifests) == set(SHIPPED)
    for name in ["cc3m", "cc12m", "megalith_10m", "openimages"]:
        assert isinstance(manifests[name], UrlListSource), name
    for name in ["sa1b", "journeydb"]:
        assert isinstance(manifests[name], ArchiveSource), name
    demo = manifests["demo_shapes"]
    assert isinstance(demo, GeneratedSource)
    assert demo.params.count >= 500
    assert min(demo.params.short_edges) < 64 <= max(demo.params.short_edges)
    assert manifests["journeydb"].captions.caption_field == "prompt"


def test_production_profile_downloads_every_real_source():
    wf = load_workflow(ROOT / "workflow.yaml", "production")
    used = {s.config.dataset for s in wf.stages.values() if s.kind.name == "download"}
    assert used == set(SHIPPED) - {"demo_shapes"}
    assert set(wf.stages["filter"].needs) == {n for n, s in wf.stages.items() if s.kind.name == "download"}
    assert wf.stages["recaption"].config.engine == "vllm" and wf.stages["recaption"].resources.gpus == 1
    assert wf.stages["tokenize"].config.tokenizer.kind == "cosmos"
    assert [r.size for r in wf.stages["tokenize"].config.resolutions] == [512, 1024]


def test_demo_profile_is_the_small_cpu_chain():
    wf = load_workflow(ROOT / "workflow.yaml")
    assert wf.profile == "demo"
    kinds = {n: wf.stages[n].kind.name for n in ("download", "filter", "recaption", "tokenize")}
    assert kinds == {"download": "download", "filter": "filter", "recaption": "recaption", "tokenize": "tokenize"}
    assert wf.stages["download"].config.dataset == "demo_shapes"
    assert wf.stages["recaption"].config.engine == "transformers" and wf.stages["recaption"].config.tiny is not None
    assert wf.stages["tokenize"].config.tokenizer.codebook_size == 1000


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    m = load_dataset_manifest(write(tmp_path, GOOD_URL_LIST))
    assert m.resolve(m.url_list) == str(tmp_path / "list.tsv")
    monkeypatch.setenv("SIMPLEAR_DATA", "/data")
    assert m.resolve("${SIMPLEAR_DATA}/x.tsv") == "/data/x.tsv"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, {**GOOD_URL_LIST, "url_column": "url"})
    msg = error_of(path)
    assert str(path) in msg and "url_column: unknown key" in msg


def test_missing_and_unknown_source(tmp_path):
    doc = dict(GOOD_URL_LIST)
    doc.pop("source")
    assert "source: required" in error_of(write(tmp_path, doc))
    assert "source" in error_of(write(tmp_path, {**GOOD_URL_LIST, "source": "ftp"}))


def test_missing_required_field_and_bad_format(tmp_path):
    doc = dict(GOOD_URL_LIST)
    doc.pop("list_origin")
    assert "url_list.list_origin: Field required" in error_of(write(tmp_path, doc))
    assert "input_format" in error_of(write(tmp_path, {**GOOD_URL_LIST, "input_format": "xlsx"}))


def test_name_must_match_the_file(tmp_path):
    assert "must match the file name 'other'" in error_of(write(tmp_path, GOOD_URL_LIST, name="other"))


def test_not_a_mapping_and_not_yaml(tmp_path):
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "not valid YAML" in error_of(write(tmp_path, "a: [b\n"))


def test_archive_captions_need_their_fields(tmp_path):
    doc = {"name": "web", "source": "archives", "description": "d", "license": "l", "archives": "*.tar",
           "captions": {"path": "c.jsonl", "format": "jsonl", "caption_field": "caption"}}
    assert "archives.captions.key_field: Field required" in error_of(write(tmp_path, doc))


def test_demo_params_rules(tmp_path):
    doc = {"name": "web", "source": "generated", "generator": "demo_shapes", "description": "d", "license": "l",
           "params": {"short_edges": [48, 64], "short_edge_weights": [1.0]}}
    assert "one weight per short_edges entry" in error_of(write(tmp_path, doc))
    doc["params"] = {"count": 0}
    assert "generated.params.count" in error_of(write(tmp_path, doc))


# ---- stage configs that name datasets or models -----------------------------------------------------


def workflow_with(tmp_path: Path, stages: dict, datasets=("demo_shapes",)) -> Path:
    (tmp_path / "datasets").mkdir(exist_ok=True)
    demo = yaml.safe_load((ROOT / "datasets_manifest/demo_shapes.yaml").read_text())
    (tmp_path / "datasets/demo_shapes.yaml").write_text(yaml.safe_dump(demo))
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"datasets_dir": "datasets", "datasets": list(datasets), "stages": stages}))
    return path


def workflow_error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_workflow(path)
    return str(e.value)


def test_download_of_a_dataset_the_workflow_does_not_list(tmp_path):
    path = workflow_with(tmp_path, {"d": {"uses": "download", "config": {"dataset": "cc3m"}}})
    msg = workflow_error(path)
    assert str(path) in msg and "stages.d.config.dataset: Value error, unknown dataset 'cc3m'" in msg


def test_data_stage_config_rules_name_the_key(tmp_path):
    stages = {
        "d": {"uses": "download", "config": {"dataset": "demo_shapes", "encode_format": "png", "encode_quality": 95}},
        "f": {"uses": "filter", "needs": ["d"], "config": {"min_short_edge": 64, "batch_sise": 3}},
        "r": {"uses": "recaption", "needs": ["f"], "config": {"model": "tiny-random", "tiny": {"num_attention_heads": 8}}},
        "t": {"uses": "tokenize", "needs": ["r"], "config": {"tokenizer": {"kind": "pixel-fsq", "levels": 10}, "resolutions": [{"size": 60}]}},
    }
    msg = workflow_error(workflow_with(tmp_path, stages))
    assert "stages.d.config.encode_quality: Value error, for png, encode_quality is the zlib level" in msg
    assert "stages.f.config.batch_sise: unknown key" in msg
    assert "stages.r.config.tiny: Value error, hidden_size / num_attention_heads must be" in msg
    assert "stages.t.config: Value error, resolutions: sizes [60] are not multiples" in msg


def test_recaption_tiny_spec_goes_with_the_tiny_model_only(tmp_path):
    stages = {"r": {"uses": "recaption", "config": {"model": "Qwen/Qwen2-VL-2B-Instruct", "tiny": {}}}}
    assert "`tiny:` is given exactly when model is 'tiny-random'" in workflow_error(workflow_with(tmp_path, stages))
