"""Helpers of the training tests: a small tokenized shapes set (a plugin stage kind in the tokenize
stage's schema) and colour statistics of decoded images; plus tests that the helpers themselves are right.

Workflows in the training tests load this module through `plugins: [test_training_helpers]`
(tests/ is on the workers' PYTHONPATH).
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.demo_shapes import PALETTE, caption_for, draw
from simplear.config import StrictModel
from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer, pil_to_tensor
from simplear.workflow import StageContext, StageResult, register_stage

COLOURS = tuple(PALETTE)  # 10 colours: 90 pairs are too many to memorise, so the model learns the colour words
SHAPES = ("circle", "square")
# (foreground, shape, background) captions never shown in training, which the colour test asks for; their
# colour pairs are trained with the other shape only. (Pairs never seen in either order come out with both
# colours but often in swapped roles at this budget: even after 1,000 steps, both roles right ~30%.)
HELD_OUT = (("red", "circle", "blue"), ("black", "square", "yellow"), ("white", "circle", "green"),
            ("cyan", "square", "purple"), ("yellow", "circle", "pink"), ("green", "square", "orange"))
VT = {"kind": "pixel-fsq", "levels": 10}  # 1,000 codes: a CPU-sized softmax


def shapes_table(count: int, size: int, seed: int, vt: dict = VT, held_out=HELD_OUT) -> pa.Table:
    """`count` square images of `size` px in the tokenize stage's schema (codes: raster order, int32)."""
    rng = random.Random(seed)
    tokenizer = load_visual_tokenizer(vt)
    triples = [(f, s, b) for f in COLOURS for b in COLOURS if f != b for s in SHAPES if (f, s, b) not in set(held_out)]
    captions, images = [], []
    for _ in range(count):
        fg, shape, bg = rng.choice(triples)
        captions.append(caption_for(fg, shape, bg))
        images.append(pil_to_tensor(draw(fg, shape, bg, size, size, rng)))
    codes = tokenizer.encode(torch.stack(images)).reshape(count, -1).to(torch.int32).numpy()
    return pa.table({
        "key": [f"{seed:03d}{i:06d}" for i in range(count)],
        "caption": captions,
        "caption_long": [f"A picture of {c}." for c in captions],
        "caption_short": [None] * count,  # long/short captions may be missing: training falls back to the original
        "tokenizer": [tokenizer.name] * count,
        "height": [size] * count,
        "width": [size] * count,
        "codes": pa.array(list(codes), type=pa.list_(pa.int32())),
    })


class ShapesTokensConfig(StrictModel):
    counts: dict[int, int] = {32: 256}  # resolution -> images
    shards: int = 2
    seed: int = 0
    tokenizer: VisualTokenizerConfig = VisualTokenizerConfig(**VT)  # the key of the real tokenize stage


@register_stage("test_shapes_tokens", ShapesTokensConfig, object_store=True)
def run_shapes_tokens(ctx: StageContext) -> StageResult:
    cfg: ShapesTokensConfig = ctx.config
    for resolution, count in cfg.counts.items():
        table = shapes_table(count, resolution, cfg.seed + resolution, cfg.tokenizer.model_dump())
        per = -(-count // cfg.shards)
        for i in range(cfg.shards):
            with ctx.output(f"{resolution}/part-{i:05d}.parquet") as tmp:
                pq.write_table(table.slice(i * per, per), tmp)
    return StageResult(metrics={"rows": sum(cfg.counts.values())})


def _nearest(rgb: np.ndarray) -> tuple[str, float]:
    names = list(PALETTE)
    dist = np.linalg.norm(np.array([PALETTE[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(dist.argmin())], float(dist.min())


def image_colours(image_3HW: torch.Tensor, downsample: int) -> tuple[str, str | None]:
    """(background, foreground) palette names read from a decoded image in [-1, 1].

    Background: the median colour of the border cells. Foreground: the most common palette colour
    among the cells that are close to a palette colour (not an edge mixture) and not the background.
    """
    cells = torch.nn.functional.avg_pool2d(image_3HW[None].float(), downsample)[0]  # (3, h, w)
    rgb = ((cells.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()  # (h, w, 3)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg, _ = _nearest(np.median(border, axis=0))
    votes: dict[str, int] = {}
    for cell in rgb.reshape(-1, 3):
        name, dist = _nearest(cell)
        if name != bg and dist < 60:
            votes[name] = votes.get(name, 0) + 1
    fg = max(votes, key=votes.get) if votes else None
    return bg, fg


# ---- tests of the helpers


def test_shapes_table_schema_and_held_out_pairs():
    t = shapes_table(40, 32, seed=1)
    assert t.column_names == ["key", "caption", "caption_long", "caption_short", "tokenizer", "height", "width", "codes"]
    assert t.schema.field("codes").type == pa.list_(pa.int32())
    assert all(len(c) == 16 for c in t["codes"].to_pylist())  # 32/8 x 32/8
    assert not {caption_for(*h) for h in HELD_OUT} & set(t["caption"].to_pylist())


def test_image_colours_reads_drawn_images():
    """On real (tokenized then decoded) images the statistic is right almost always: the colour test's ceiling."""
    tok = load_visual_tokenizer(VT)
    rng = random.Random(0)
    right = 0
    trials = [(f, s, b) for f in COLOURS for b in COLOURS if f != b for s in SHAPES]
    for fg, shape, bg in trials:
        img = pil_to_tensor(draw(fg, shape, bg, 48, 48, rng))
        decoded = tok.decode(tok.encode(img[None]))[0]
        right += image_colours(decoded, tok.downsample) == (bg, fg)
    assert right / len(trials) >= 0.9
