"""Scorers beside GenEval: DPG's parent rule and aggregation with a fake judge, the Qwen2-VL judge on a tiny
random model, the demo's shapes scorer on drawn pictures, the configs and the reward adapter. No Ray, no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from simplear.demo_captions import PALETTE, caption_for, draw
from simplear.scorers import EvalItem, ScorerConfig, build_scorer
from simplear.scorers.dpg import DpgScorer, apply_parent_rule, grid_tiles, load_items as load_dpg, make_grid
from simplear.scorers.shapes import ShapesScorer
from simplear.visual_tokenizers import pil_to_tensor


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
    figures = summary["figures"]
    assert figures["colour_attribution"]["mean"] == pytest.approx(2 / 3) and figures["shape_correct"]["mean"] == pytest.approx(2 / 3)
    assert figures["shape_correct"]["count"] == 3
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
