"""Rewards: color_match on hand-made images, the real clip/hps path on a tiny open_clip built from a config."""

from __future__ import annotations

import json
import random

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from pipelines.demo_shapes import PALETTE, draw
from simplear.rewards import (
    ClipReward,
    ColorMatchReward,
    RewardConfig,
    WeightedRewards,
    build_reward,
    colour_words,
)
from simplear.visual_tokenizers import pil_to_tensor

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def solid(colour: str, h: int = 64, w: int = 64) -> torch.Tensor:
    """(3, H, W) image in [-1, 1] filled with a palette colour."""
    return (torch.tensor(PALETTE[colour], dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, h, w).clone()


def paint(img: torch.Tensor, colour: str, top: int, left: int, size: int) -> torch.Tensor:
    img[:, top: top + size, left: left + size] = solid(colour, size, size)
    return img


# -- color_match ---------------------------------------------------------------------------------


def test_color_match_hand_made_images_score_what_the_rule_says():
    reward = ColorMatchReward()  # border ring 8 px on 64 px: 1792 border pixels, 48x48 = 2304 inside
    caption = "a red square on a blue background"

    right = paint(solid("blue"), "red", 24, 24, 16)  # 256 red pixels inside: above the 10% target
    assert reward([right], [caption]) == [pytest.approx(1.0)]

    assert reward([solid("blue")], [caption]) == [pytest.approx(0.5)]  # background right, no shape colour

    half = solid("blue")
    half[:, :, 32:] = solid("green", 64, 32)  # half of the border is the background colour
    assert reward([half], [caption]) == [pytest.approx(0.25)]

    small = paint(solid("blue"), "red", 26, 26, 12)  # 144 / 2304 = 6.25% red: presence 0.625
    assert reward([small], [caption]) == [pytest.approx(0.5 + 0.5 * 0.0625 / 0.1)]

    swapped = paint(solid("red"), "blue", 24, 24, 16)  # roles swapped: the border is wrong, red is inside
    assert reward([swapped], [caption]) == [pytest.approx(0.5)]
    assert reward([solid("green")], [caption]) == [pytest.approx(0.0)]


def test_color_match_on_demo_images_and_batched_tensors():
    reward = ColorMatchReward()
    rng = random.Random(0)
    imgs, right, swapped, absent = [], [], [], []
    for fg, shape, bg in [("red", "circle", "blue"), ("yellow", "square", "black"), ("pink", "cross", "green")]:
        imgs.append(pil_to_tensor(draw(fg, shape, bg, 64, 64, rng)))
        right.append(f"a {fg} {shape} on a {bg} background")
        swapped.append(f"a {bg} {shape} on a {fg} background")
        absent.append(f"a white {shape} on an orange background")
    batch = torch.stack(imgs)
    good, bad, none = reward(batch, right), reward(batch, swapped), reward(batch, absent)
    assert min(good) > 0.8, good
    assert max(bad) < 0.6, bad
    assert max(none) == 0.0


def test_color_match_free_text_prompts_and_unscorable():
    reward = ColorMatchReward()
    assert colour_words("A Red and BLUE thing, red again") == ["red", "blue"]
    img = solid("red")
    img[:, :, 32:] = solid("blue", 64, 32)
    assert reward([img, img, img], ["red stuff", "red and green", "nothing to see"]) == [
        pytest.approx(1.0), pytest.approx(0.5), None
    ]


def test_color_match_tolerates_tokenizer_quantisation():
    from simplear.visual_tokenizers import load_visual_tokenizer

    tok = load_visual_tokenizer({"kind": "pixel-fsq", "levels": 6, "downsample": 8})
    img = paint(solid("white"), "purple", 16, 16, 32)[None]
    decoded = tok.decode(tok.encode(img))
    assert ColorMatchReward()(decoded, ["a purple square on a white background"]) == [pytest.approx(1.0)]


# -- clip / hps ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "simplear-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return {"kind": "clip", "model": "simplear-test-tiny-clip", "pretrained": None, "model_config_file": str(path)}


def test_clip_reward_is_the_cosine_of_open_clip_embeddings(tiny_clip_config):
    import open_clip

    torch.manual_seed(0)
    reward = build_reward(tiny_clip_config)
    assert isinstance(reward, ClipReward) and reward.name == "clip"
    rng = random.Random(1)
    pils = [draw("red", "circle", "blue", 32, 32, rng), draw("green", "square", "white", 32, 32, rng)]
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    scores = reward(pils, prompts)

    # the same numbers through open_clip's own PIL transform and tokenizer (32 px: no resize to disagree on)
    _, _, preprocess = open_clip.create_model_and_transforms("simplear-test-tiny-clip", pretrained=None)
    with torch.no_grad():
        img = reward.model.encode_image(torch.stack([preprocess(p) for p in pils]))
        txt = reward.model.encode_text(open_clip.get_tokenizer("simplear-test-tiny-clip")(prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(-1 <= s <= 1 for s in scores)
    # tensors in [-1, 1] (what the visual tokenizer decodes) score the same as the PIL images
    assert reward(torch.stack([pil_to_tensor(p) for p in pils]), prompts) == pytest.approx(scores, abs=1e-5)
    # other sizes are resized and centre-cropped like open_clip's transform
    big = reward([draw("red", "circle", "blue", 96, 64, rng)], prompts[:1])
    assert len(big) == 1 and -1 <= big[0] <= 1


def test_hps_reward_loads_a_checkpoint_over_the_architecture(tiny_clip_config, tmp_path):
    torch.manual_seed(0)
    clip = build_reward(tiny_clip_config)
    # HPSv2 checkpoints are {"state_dict": ...} saved from DDP ("module." prefixes)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.model.state_dict().items()}}, ckpt)
    torch.manual_seed(123)  # a different random init: only the checkpoint can make the scores agree
    hps = build_reward({**tiny_clip_config, "kind": "hps", "checkpoint": str(ckpt)})
    assert hps.name == "hps"
    imgs = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a red circle", "a cat", "a blue square on a white background"]
    assert hps(imgs, prompts) == pytest.approx(clip(imgs, prompts), abs=1e-6)


def test_weighted_rewards_combine(tiny_clip_config):
    rewards = WeightedRewards.from_configs([{"kind": "color_match", "weight": 2.0}, {**tiny_clip_config, "weight": 0.5}])
    img = paint(solid("blue"), "red", 24, 24, 16)[None]
    img32 = torch.nn.functional.interpolate(img, size=(32, 32))
    out = rewards.score(torch.cat([img32, img32]), ["a red square on a blue background", "no colour words here"])
    assert out["color_match"][0] == pytest.approx(1.0) and out["color_match"][1] is None
    assert out["total"][0] == pytest.approx(2.0 + 0.5 * out["clip"][0])
    assert out["total"][1] == pytest.approx(0.5 * out["clip"][1])  # unscored parts are left out, not zero


def test_reward_configs_are_strict():
    adapter = TypeAdapter(RewardConfig)
    assert adapter.validate_python({"kind": "color_match"}).fg_target == 0.1
    with pytest.raises(ValidationError, match="checkpoint"):
        adapter.validate_python({"kind": "hps"})
    with pytest.raises(ValidationError, match="Extra inputs|extra"):
        adapter.validate_python({"kind": "clip", "modle": "ViT-B-32"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "aesthetic"})
    with pytest.raises(FileNotFoundError):
        build_reward({"kind": "hps", "model": "ViT-B-32", "checkpoint": "/nonexistent/hps.pt"})


def test_shape_match_sees_the_drawn_shape_and_only_that():
    import random

    from simplear.demo_captions import SHAPES, caption_for, draw
    from simplear.rewards import ShapeMatchReward
    from simplear.visual_tokenizers import pil_to_tensor

    reward = ShapeMatchReward()
    rng = random.Random(4)
    hits, total = 0, 0
    for shape in SHAPES:
        for _ in range(6):
            image = pil_to_tensor(draw("red", shape, "blue", 64, 64, rng)).unsqueeze(0)
            right = reward(image, [caption_for("red", shape, "blue")])[0]
            wrong = reward(image, [caption_for("red", next(s for s in SHAPES if s != shape), "blue")])[0]
            hits += right == 1.0 and wrong == 0.0
            total += 1
    assert hits / total >= 0.9, (hits, total)
    assert reward(torch.zeros(1, 3, 32, 32), ["a photo of a dog"]) == [None]  # not a demo caption
