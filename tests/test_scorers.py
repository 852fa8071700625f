"""Scorers: GenEval's rules on hand-made detections, its detector and colour classifier on tiny random models
built from configs, DPG's parent rule and aggregation with a fake judge, the Qwen2-VL judge on a tiny random
model, the demo's shapes scorer on drawn pictures, the GenEval comparison script. No Ray, no network."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from simplear.demo_captions import PALETTE, caption_for, draw
from simplear.scorers import EvalItem, GenEvalConfig, ScorerConfig, build_scorer
from simplear.scorers.dpg import DpgScorer, apply_parent_rule, grid_tiles, load_items as load_dpg, make_grid
from simplear.scorers.geneval import (
    RESULT_FIELDS,
    Detection,
    evaluate_metadata,
    keep_detections,
    load_items as load_geneval,
    relative_position,
    summarize_results,
)
from simplear.scorers.shapes import ShapesScorer
from simplear.visual_tokenizers import pil_to_tensor

ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CFG = GenEvalConfig()


def det(x1, y1, x2, y2, score=0.95) -> Detection:
    return Detection((x1, y1, x2, y2), score)


def no_colours(name, dets):
    raise AssertionError("colour asked for a clause without one")


# -- GenEval rules -------------------------------------------------------------------------------


def test_geneval_counting_uses_the_counting_threshold_and_excludes_one_more():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    judge = lambda scores: evaluate_metadata(  # noqa: E731
        keep_detections({"dog": [det(i, 0, i + 5, 5, s) for i, s in enumerate(scores)]}, "counting", CFG), meta, no_colours)
    assert judge([0.95, 0.92, 0.5]) == (True, "")
    assert judge([0.95, 0.85, 0.5]) == (False, "expected dog>=2, found 1")  # 0.85 passes 0.3, not 0.9
    assert judge([0.95, 0.92, 0.91]) == (False, "expected dog<3, found 3")
    assert judge([0.95, 0.92, 0.9]) == (True, "")  # strictly above the threshold
    assert len(keep_detections({"dog": [det(0, 0, 5, 5, 0.85)]}, "two_object", CFG)["dog"]) == 1


def test_geneval_keeps_sixteen_per_class_most_confident_first_and_nms_only_when_asked():
    dets = [det(0, 0, 10, 10, 0.4 + 0.01 * i) for i in range(20)]
    kept = keep_detections({"cup": dets, "cat": [det(0, 0, 1, 1, 0.2)]}, "single_object", CFG)
    assert list(kept) == ["cup"] and len(kept["cup"]) == 16
    assert [d.score for d in kept["cup"]] == sorted((d.score for d in dets), reverse=True)[:16]
    nms = CFG.model_copy(update={"max_overlap": 0.5})
    boxes = [det(0, 0, 10, 10, 0.9), det(1, 1, 11, 11, 0.8), det(50, 50, 60, 60, 0.7)]
    assert [d.score for d in keep_detections({"cup": boxes}, "single_object", nms)["cup"]] == [0.9, 0.7]


def test_geneval_relative_position_with_its_margin():
    b = (100, 100, 120, 120)
    assert relative_position((0, 100, 20, 120), b, 0.1) == {"left of"}
    assert relative_position((200, 95, 220, 115), b, 0.1) == {"right of"}
    assert relative_position((100, 0, 120, 20), b, 0.1) == {"above"}
    assert relative_position((100, 200, 120, 220), b, 0.1) == {"below"}
    assert relative_position((0, 0, 20, 20), b, 0.1) == {"left of", "above"}
    # centres 3 px apart, boxes 20 + 20 wide: the 0.1 margin (4 px) swallows the offset; without it, "right of"
    assert relative_position((103, 100, 123, 120), b, 0.1) == set()
    assert relative_position((103, 100, 123, 120), b, 0.0) == {"right of"}


def test_geneval_position_clause_checks_against_its_target_group():
    meta = {"tag": "position", "include": [{"class": "skateboard", "count": 1},
                                           {"class": "bird", "count": 1, "position": ["below", 0]}]}
    board = det(100, 100, 140, 120)
    assert evaluate_metadata({"skateboard": [board], "bird": [det(100, 200, 120, 220)]}, meta, no_colours) == (True, "")
    ok, reason = evaluate_metadata({"skateboard": [board], "bird": [det(100, 0, 120, 20)]}, meta, no_colours)
    assert not ok and reason == "expected bird below target, found above target"
    ok, reason = evaluate_metadata({"bird": [det(100, 200, 120, 220)]}, meta, no_colours)
    assert not ok and reason == "expected skateboard>=1, found 0\nno target for bird to be below"


def test_geneval_colour_attribution_and_colours_of_the_most_confident_only():
    racket, sink, other = det(0, 0, 10, 10, 0.9), det(50, 50, 60, 60, 0.8), det(20, 20, 30, 30, 0.7)
    meta = {"tag": "color_attr", "include": [{"class": "tennis racket", "count": 1, "color": "purple"},
                                             {"class": "sink", "count": 1, "color": "black"}]}
    paint = {racket.box: "purple", sink.box: "black", other.box: "black"}
    colours_of = lambda name, dets: [paint[d.box] for d in dets]  # noqa: E731
    assert evaluate_metadata({"tennis racket": [racket], "sink": [sink]}, meta, colours_of) == (True, "")
    paint.update({racket.box: "black", sink.box: "purple"})  # swapped colours
    ok, reason = evaluate_metadata({"tennis racket": [racket], "sink": [sink]}, meta, colours_of)
    assert not ok and reason.splitlines() == ["expected purple tennis racket>=1, found 0 purple; and 1 black",
                                              "expected black sink>=1, found 0 black; and 1 purple"]
    # only the count most confident objects are asked: a black sink below a purple one does not count
    paint.update({sink.box: "purple", other.box: "black"})
    meta1 = {"tag": "colors", "include": [{"class": "sink", "count": 1, "color": "black"}]}
    assert not evaluate_metadata({"sink": [sink, other]}, meta1, colours_of)[0]


def test_geneval_single_and_two_objects():
    one = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert evaluate_metadata(keep_detections({"bench": [det(0, 0, 5, 5, 0.35)]}, "single_object", CFG), one, no_colours)[0]
    assert not evaluate_metadata(keep_detections({"bench": [det(0, 0, 5, 5, 0.25)]}, "single_object", CFG), one, no_colours)[0]
    two = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "tie", "count": 1}]}
    assert evaluate_metadata({"bench": [det(0, 0, 5, 5)], "tie": [det(9, 9, 12, 12)]}, two, no_colours) == (True, "")
    assert evaluate_metadata({"bench": [det(0, 0, 5, 5)]}, two, no_colours) == (False, "expected tie>=1, found 0")


def test_geneval_items_and_summary(tmp_path):
    lines = [{"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"},
             {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
              "prompt": "a photo of two cups"}]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = load_geneval(path, samples_per_prompt=2)
    assert [i.id for i in items] == ["00000/samples/0000.png", "00000/samples/0001.png", "00001/samples/0000.png",
                                     "00001/samples/0001.png"]
    assert items[3].metadata == lines[1] and items[3].tag == "counting"
    rows = [{"tag": "single_object", "correct": c, "metadata": "a"} for c in (True, True, True, False)]
    rows += [{"tag": "counting", "correct": c, "metadata": m} for c, m in ((False, "b"), (False, "c"))]
    summary = summarize_results(rows)
    assert summary["categories"]["single_object"]["mean"] == 0.75 and summary["categories"]["counting"]["mean"] == 0.0
    assert summary["overall"]["mean"] == pytest.approx(0.375)  # the mean of the task scores, not of the images
    assert summary["correct_prompts"] == pytest.approx(1 / 3) and summary["prompts"] == 3
    assert "colors" in summary["tasks_missing"]


# -- GenEval's models on tiny random ones -----------------------------------------------------------


def tiny_mask2former(folder: Path, labels: list[str], dominant: str | None = None) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=8, id2label=dict(enumerate(labels)),
                               label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if dominant is not None:  # every query says `dominant`: detections become predictable
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.fill_(-10.0)
            model.class_predictor.bias[labels.index(dominant)] = 10.0
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_instance_postprocessing_on_hand_made_outputs():
    from simplear.scorers.geneval_models import instances

    class_logits = torch.full((2, 3), -20.0)
    class_logits[0, 1] = 20.0  # query 0: class 1 ("dog"), sure
    class_logits[1, 2] = 20.0  # query 1: "no object"
    masks = torch.full((2, 10, 12), -5.0)
    masks[0, 2:5, 3:9] = 3.0
    found = instances(class_logits, masks, ["cat", "dog"], min_score=0.5)
    assert list(found) == ["dog"] and len(found["dog"]) == 1
    dog = found["dog"][0]
    assert dog.box == (3.0, 2.0, 9.0, 5.0)  # x2, y2 one past the mask, as mmdet's mask2bbox
    assert dog.score == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-4)
    assert dog.mask.shape == (10, 12) and dog.mask.sum() == 18


def test_mask2former_detector_runs_and_applies_the_threshold(tmp_path):
    from PIL import Image

    from simplear.scorers.geneval_models import Mask2FormerDetector

    folder = tiny_mask2former(tmp_path / "m2f", ["person", "dog", "mouse"])
    detector = Mask2FormerDetector(str(folder), torch.device("cpu"), resize=(48, 64))
    assert detector.class_names == ["person", "dog", "computer mouse"]  # GenEval's name for COCO's mouse
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (48, 64), (30, 30, 200))]
    every = detector.detect(images)
    assert len(every) == 2
    for image, found in zip(images, every):
        assert set(found) <= set(detector.class_names)
        for d in (d for ds in found.values() for d in ds):
            assert d.mask.shape == (image.height, image.width)
            assert 0 <= d.box[0] <= d.box[2] <= image.width and 0 <= d.box[1] <= d.box[3] <= image.height
    scores = sorted(d.score for ds in every[0].values() for d in ds)
    assert scores, "the random detector found nothing at all"
    assert len(scores) > 1, "too few random detections to test a threshold"
    gap = max(range(len(scores) - 1), key=lambda k: scores[k + 1] - scores[k])
    cut = (scores[gap] + scores[gap + 1]) / 2
    above = detector.detect(images, min_score=cut)[0]
    assert sorted(d.score for ds in above.values() for d in ds) == pytest.approx(scores[gap + 1:])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from simplear.rewards import ClipReward, ClipRewardConfig

    path = tmp_path_factory.mktemp("clip") / "simplear-scorers-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    config = ClipRewardConfig(model="simplear-scorers-tiny-clip", pretrained=None, model_config_file=str(path), device="cpu")
    return config, ClipReward(config)


def test_clip_colour_classifier_is_zero_shot_over_the_masked_crop(tiny_clip):
    import numpy as np
    from PIL import Image

    from simplear.scorers.geneval import COLOUR_TEMPLATES, COLOURS
    from simplear.scorers.geneval_models import ClipColourClassifier

    _, clip = tiny_clip
    clf = ClipColourClassifier(clip, COLOURS, COLOUR_TEMPLATES, "#999999")
    image = Image.new("RGB", (40, 30), (10, 200, 10))
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:20] = True
    mask[5, 10] = False
    d = Detection((10, 5, 25, 15), 0.9, mask)
    crop = np.asarray(clf.crop(image, d))
    assert crop.shape == (10, 15, 3)
    assert (crop[0, 0] == 0x99).all() and (crop[:, 10:] == 0x99).all() and (crop[5, 5] == (10, 200, 10)).all()
    w = clf.weights("dog")
    assert w.shape == (10, 32) and torch.allclose(w.norm(dim=-1), torch.ones(10))
    red = clip.text_features([t.format(colour="red", object="dog") for t in COLOUR_TEMPLATES]).mean(0)
    assert torch.allclose(w[0], red / red.norm(), atol=1e-6)
    expected = COLOURS[int((clip.image_features([Image.fromarray(crop)]) @ w.T).argmax())]
    assert clf.classify(image, [d], "dog") == [expected]


def test_geneval_scorer_end_to_end_writes_results_jsonl(tmp_path, tiny_clip):
    from PIL import Image

    clip_config, _ = tiny_clip
    folder = tiny_mask2former(tmp_path / "m2f", ["person", "dog"], dominant="dog")
    scorer = build_scorer({"kind": "geneval", "detector": str(folder), "detector_resize": [64, 64], "device": "cpu",
                           "colour_clip": clip_config.model_dump()})
    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "single_object", "include": [{"class": "person", "count": 1}], "prompt": "a photo of a person"},
             {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"}]
    items = [EvalItem(prompt=m["prompt"], id=f"{k:05d}/samples/0000.png", metadata=m) for k, m in enumerate(metas)]
    items.append(EvalItem(prompt="no metadata"))
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    records = scorer.score(images, items)
    assert [r["score"] for r in records[:2]] == [1.0, 0.0] and records[3]["score"] is None
    assert records[1]["reason"] == "expected person>=1, found 0"
    assert records[2]["score"] in (0.0, 1.0) and records[2]["category"] == "colors"
    assert set(json.loads(records[0]["details"])) == {"dog"}
    (path,) = scorer.write(records, tmp_path / "out")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name == "results.jsonl" and len(rows) == 3 and all(list(r) == list(RESULT_FIELDS) for r in rows)
    summary = scorer.aggregate(records)
    assert summary["categories"]["single_object"] == {"mean": 0.5, "se": 0.5, "count": 2}
    assert summary["unscored"] == 1 and summary["overall"]["count"] == 3
    with pytest.raises(ValueError, match="no class"):
        scorer.score(images[:1], [EvalItem(prompt="x", metadata={"tag": "single_object", "include": [{"class": "cup", "count": 1}]})])


# -- the comparison script ---------------------------------------------------------------------------


def test_compare_geneval_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_geneval", ROOT / "scripts" / "compare_geneval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def row(folder, p, s, tag, correct, reason=""):
        return {"filename": f"{folder}/{p:05d}/samples/{s:04d}.png", "tag": tag, "prompt": f"prompt {p}",
                "correct": correct, "reason": reason, "metadata": f"meta {p}", "details": "{}"}

    a = [row("/abs/imgs", 0, 0, "single_object", True), row("/abs/imgs", 0, 1, "single_object", True),
         row("/abs/imgs", 1, 0, "counting", False, "expected cup>=2, found 1"), row("/abs/imgs", 2, 0, "position", True)]
    b = [row("ours", 0, 0, "single_object", True), row("ours", 0, 1, "single_object", False, "expected cup>=1, found 0"),
         row("ours", 1, 0, "counting", False, "expected cup>=2, found 0")]
    for name, rows in (("a.jsonl", a), ("b.jsonl", b)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert (cmp["common"], cmp["only_a"], cmp["only_b"]) == (3, 1, 0)
    assert cmp["agreement"] == pytest.approx(2 / 3)
    assert cmp["agreement_by_task"] == {"single_object": 0.5, "counting": 1.0}
    assert cmp["a"]["categories"]["position"]["mean"] == 1.0 and cmp["b"]["categories"]["single_object"]["mean"] == 0.5
    assert [(d["image"], d["a"], d["b"]) for d in cmp["disagreements"]] == [("0/1", True, False)]
    out = capsys.readouterr().out
    assert "disagreements: 1" in out and "expected cup>=1, found 0" in out


# -- DPG ---------------------------------------------------------------------------------------------


def test_dpg_parent_rule_zeroes_children_of_a_no_and_cascades():
    parents = {1: [0], 2: [1], 3: [2], 4: [0], 5: [1, 4]}
    assert apply_parent_rule({1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}, parents) == {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0}
    assert apply_parent_rule({1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, parents) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0}
    assert apply_parent_rule({1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}, parents)[5] == 0.0


def write_dpg_csv(path: Path, rows: list[tuple]) -> Path:
    header = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language\n"
    path.write_text(header + "".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows))
    return path


CAT_ROWS = [
    ("cat", "a red cat sitting", "", 1, "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"),
    ("cat", "a red cat sitting", "", 2, "1", "attribute", "color", "attribute - color (cat, red)", "Is the cat red?"),
    ("cat", "a red cat sitting", "", 3, "1,2", "attribute", "state", "attribute - state (cat, sitting)", "Is the cat sitting?"),
]


class TileColourJudge:
    """A yes/no judge that sees each tile's colour: a cat everywhere, red only on red tiles, sitting everywhere."""

    name = "fake"

    def __init__(self):
        self.asked = []

    def p_yes(self, images, questions):
        self.asked += list(questions)
        red = [img.getpixel((0, 0)) == PALETTE["red"] for img in images]
        return [0.1 if ("red" in q and not r) else 0.9 for img, q, r in zip(images, questions, red)]


def test_dpg_scorer_tiles_parent_rule_and_categories(tmp_path):
    from PIL import Image

    items = load_dpg(write_dpg_csv(tmp_path / "dpg_bench.csv", CAT_ROWS + [
        ("dog", "a dog", "", 1, "0", "entity", "whole", "entity - whole (dog)", "Is there a dog?")]))
    assert [(i.id, i.prompt, len(i.metadata["questions"])) for i in items] == [("cat", "a red cat sitting", 3), ("dog", "a dog", 1)]
    tiles = [Image.new("RGB", (16, 16), PALETTE[c]) for c in ("red", "green", "blue", "white")]
    grid = make_grid(tiles)
    assert [t.getpixel((3, 3)) for t in grid_tiles(grid)] == [PALETTE[c] for c in ("red", "green", "blue", "white")]
    judge = TileColourJudge()
    scorer = DpgScorer(TypeAdapter(ScorerConfig).validate_python({"kind": "dpg"}), judge=judge)
    records = scorer.score([grid, grid, grid], items + [EvalItem(prompt="plain")])
    assert len(judge.asked) == 4 * 3 + 4 * 1
    cat = records[0]
    # red tile: 1, 1, 1; others: cat yes, red no, sitting zeroed (its parent 2 said no) -> 1/3
    assert cat["tile_scores"] == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert cat["score"] == pytest.approx(0.5) and records[1]["score"] == 1.0 and records[2]["score"] is None
    summary = scorer.aggregate(records)
    assert summary["overall"]["mean"] == pytest.approx(0.75) and summary["overall"]["count"] == 2
    assert summary["unscored"] == 1
    # official: the raw answers on the last (white) tile: sitting counts as yes there, before the parent rule
    assert summary["subcategories"]["attribute - color"]["mean"] == 0.0
    assert summary["subcategories"]["attribute - state"]["mean"] == 1.0
    assert summary["categories"]["attribute"]["mean"] == 0.5 and summary["categories"]["entity"]["mean"] == 1.0
    all_tiles = DpgScorer(scorer.config.model_copy(update={"category_scores": "all_tiles"}), judge=judge)
    assert all_tiles.aggregate(records)["subcategories"]["attribute - state"]["mean"] == pytest.approx(0.25)


def test_dpg_questions_file_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"parents \[7\]"):
        load_dpg(write_dpg_csv(tmp_path / "a.csv", CAT_ROWS[:1] + [CAT_ROWS[1][:4] + ("7",) + CAT_ROWS[1][5:]]))
    (tmp_path / "b.csv").write_text("item_id,text,question\nx,y,z\n")
    with pytest.raises(ValueError, match="no column"):
        load_dpg(tmp_path / "b.csv")


def test_qwen_vl_judge_on_a_tiny_random_model(tmp_path):
    from PIL import Image

    from pipelines.recaption import TinyQwen2VL, build_tiny_qwen2vl
    from simplear.vqa_judge import QwenVlJudge, VqaJudgeConfig, first_token_ids, p_yes_from_logits

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    expected = torch.sigmoid(torch.logsumexp(logits[:, [1, 3]], -1) - logits[:, 2])
    assert torch.allclose(p_yes_from_logits(logits, [1, 3], [2]), expected)

    folder = build_tiny_qwen2vl(tmp_path / "qwen", TinyQwen2VL(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                                                               intermediate_size=64, num_hidden_layers=1, vision_embed_dim=32))
    config = VqaJudgeConfig(model=str(folder), device="cpu", precision="fp32", batch_size=3, max_pixels=56 * 56)
    judge = QwenVlJudge(config)
    assert judge.yes_ids == first_token_ids(judge.processor.tokenizer, ["yes", "Yes"]) and not set(judge.yes_ids) & set(judge.no_ids)
    text = judge.chat_text("Is the cat red?")
    assert "Is the cat red? Answer yes or no." in text and "<|image_pad|>" in text and text.endswith("assistant\n")
    images = [Image.new("RGB", s, c) for s, c in (((56, 56), (200, 0, 0)), ((84, 56), (0, 0, 200)),
                                                   ((56, 56), (0, 200, 0)), ((56, 84), (9, 9, 9)))]
    questions = ["Is the cat red?", "Is there a dog next to a large blue car?", "Cat?", "Is the picture dark?"]
    batched = judge.p_yes(images, questions)  # 3 + 1, left-padded to different lengths
    one_by_one = QwenVlJudge(config.model_copy(update={"batch_size": 1}))
    assert all(0 < p < 1 for p in batched)
    assert batched == pytest.approx(one_by_one.p_yes(images, questions), abs=1e-4)


# -- the demo's shapes -------------------------------------------------------------------------------


def test_shapes_scorer_on_drawn_pictures():
    rng = random.Random(3)
    drawn = [("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "black"),
             ("purple", "cross", "cyan")]
    images = [draw(fg, shape, bg, 96, 80, rng) for fg, shape, bg in drawn]
    captions = [caption_for(*drawn[0]),
                caption_for("green", "diamond", "white"),  # wrong shape
                caption_for("black", "triangle", "yellow"),  # colours swapped
                "a photo of a cat"]
    scorer = build_scorer({"kind": "shapes"})
    assert isinstance(scorer, ShapesScorer)
    records = scorer.score(images, [EvalItem(prompt=c) for c in captions])
    assert records[0]["seen"] == {"background": "blue", "foreground": "red", "shape": "circle"}
    assert [(r["score"], r.get("colour_attribution"), r.get("shape_correct")) for r in records] == [
        (1.0, True, True), (0.0, True, False), (0.0, False, True), (None, None, None)]
    for image, (fg, shape, bg) in zip(images, drawn):
        seen = scorer.read(pil_to_tensor(image))
        assert seen == {"background": bg, "foreground": fg, "shape": shape}
    summary = scorer.aggregate(records)
    assert summary["overall"]["mean"] == pytest.approx(1 / 3) and summary["unscored"] == 1
    assert summary["colour_attribution"]["mean"] == pytest.approx(2 / 3) and summary["shape"]["mean"] == pytest.approx(2 / 3)
    assert summary["categories"]["diamond"] == {"mean": 0.0, "se": None, "count": 1}


# -- configs and the reward adapter -------------------------------------------------------------------


def test_scorer_configs_are_strict_and_discriminated():
    adapter = TypeAdapter(ScorerConfig)
    assert adapter.validate_python({"kind": "geneval"}).counting_threshold == 0.9
    assert adapter.validate_python({"kind": "dpg", "judge": {"model": "/m"}}).judge.model == "/m"
    with pytest.raises(ValidationError, match="extra"):
        adapter.validate_python({"kind": "geneval", "treshold": 0.5})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "hps"})  # the HPS checkpoint is required
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "fid"})


def test_clip_score_and_hps_are_the_clip_reward(tiny_clip, tmp_path):
    clip_config, clip = tiny_clip
    ckpt = tmp_path / "clip.pt"  # the weights the fixture's reward drew, so that a second model scores the same
    torch.save(clip.model.state_dict(), ckpt)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a blue square", "a cat"]
    items = [EvalItem(prompt=p, metadata={"tag": t}) for p, t in zip(prompts, ["colors", "colors", "counting"])]
    reward = {**clip_config.model_dump(), "checkpoint": str(ckpt)}
    for kind in ("clip_score", "hps"):
        scorer = build_scorer({"kind": kind, "reward": {**reward, "kind": "hps" if kind == "hps" else "clip"}})
        records = scorer.score(images, items)
        assert scorer.name == kind
        assert [r["score"] for r in records] == pytest.approx(clip(images, prompts), abs=1e-5)
    summary = scorer.aggregate(records)
    assert summary["categories"]["colors"]["count"] == 2 and summary["categories"]["counting"]["count"] == 1
    assert summary["overall"]["mean"] == pytest.approx(sum(r["score"] for r in records) / 3)
