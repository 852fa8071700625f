"""GenEval without mmdet: its rules on hand-made detections, its detector and colour classifier on tiny random
models built from configs, the scorer end to end, the comparison script. No Ray, no network."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from simplear.scorers import EvalItem, GenEvalConfig, build_scorer
from simplear.scorers.geneval import (
    RESULT_FIELDS,
    Detection,
    evaluate_metadata,
    keep_detections,
    load_items as load_geneval,
    relative_position,
    summarize_results,
)

ROOT = Path(__file__).resolve().parent.parent
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


def _official_relative_position(a, b):
    """GenEval's evaluate_images.py rule as it runs there: numpy on its mmdet float32 box rows, Python constants."""
    import numpy as np

    boxes = np.array([a, b], dtype=np.float32)[:, :4].reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def test_geneval_decides_boundaries_in_float32_and_ties_later_first_as_the_official_script():
    """Where float64 and GenEval's float32 disagree, the official decision: a score of float32(0.3) is not above
    0.3, a relation at dx = 0.5 to float32's rounding; equal scores order the later detection first (numpy's
    argsort(...)[::-1]), so the colour of a one-object clause is read on that one."""
    import random

    import numpy as np

    at_threshold = float(np.float32(0.3))  # 0.30000001192..., above 0.3 in float64
    assert keep_detections({"cup": [det(0, 0, 5, 5, at_threshold)]}, "single_object", CFG) == {}
    a, b = (10.0, 15.919797897338867, 13.0, 25.919797897338867), (0.0, 0.0, 3.0, 10.0)
    assert relative_position(a, b, 0.1) == _official_relative_position(a, b) == {"below"}  # float64: also "right of"
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.uniform(-50, 50), rng.uniform(-50, 50)]
        a += [a[0] + rng.uniform(0, 40), a[1] + rng.uniform(0, 40)]
        assert relative_position(a, b, 0.1) == _official_relative_position(a, b)
    first, second, third = det(0, 0, 5, 5, 0.8), det(10, 10, 15, 15, 0.8), det(20, 20, 25, 25, 0.9)
    assert keep_detections({"cup": [first, second, third]}, "single_object", CFG)["cup"] == [third, second, first]
    scores = np.array([0.8, 0.8, 0.9], dtype=np.float32)
    assert np.argsort(scores)[::-1].tolist() == [2, 1, 0]  # the official order on the same scores
    meta = {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}]}
    colours = lambda name, found: ["red" if d is second else "blue" for d in found]  # noqa: E731
    kept = keep_detections({"cup": [first, second]}, "color_attr", CFG)
    assert evaluate_metadata(kept, meta, colours) == (True, "")


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
    ((name, text),) = scorer.records(records).items()
    rows = [json.loads(line) for line in text.splitlines()]
    assert name == "results.jsonl" and len(rows) == 3 and all(list(r) == list(RESULT_FIELDS) for r in rows)
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


