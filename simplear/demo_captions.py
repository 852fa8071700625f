"""The demo set's captions ("a red circle on a blue background") and pictures: colours, shapes, the grammar
that writes and reads captions, and the drawing of one image.

In the library, not in the demo's data pipeline, because rewards and evaluations read colours and
shapes back (`simplear.rewards`) and the library never imports `pipelines/`.
"""

from __future__ import annotations

import random
import re

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "pink": (245, 140, 190),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

_CAPTION = re.compile(r"^an? (?P<fg>\w+) (?P<shape>\w+) on an? (?P<bg>\w+) background$")


def caption_for(fg: str, shape: str, bg: str) -> str:
    return f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(foreground colour, shape, background colour) of a demo caption, or None if it is not one."""
    m = _CAPTION.match(caption.strip().lower())
    if not m or m["fg"] not in PALETTE or m["bg"] not in PALETTE or m["shape"] not in SHAPES:
        return None
    return m["fg"], m["shape"], m["bg"]


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (foreground colour, shape, background colour) the demo can draw: 10 x 9 x 5 = 450."""
    return [(fg, shape, bg) for fg in PALETTE for shape in SHAPES for bg in PALETTE if bg != fg]


def held_out_combinations(count: int, seed: int) -> list[tuple[str, str, str]]:
    """`count` combinations the demo set never draws (a function of the set's seed), so that an evaluation on
    them asks for pictures no model was trained on; every colour and shape still appears in training."""
    rng = random.Random(f"held-out/{seed}")
    return sorted(rng.sample(all_combinations(), count))


def paint_shape(canvas, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` (centre cx, cy; half-size r: its bounding box is 2r x 2r) on a PIL ImageDraw."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif shape == "square":
        canvas.rectangle(box, fill=fill)
    elif shape == "triangle":
        canvas.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        canvas.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r / 3
        canvas.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        canvas.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r} (shapes: {', '.join(SHAPES)})")


def draw(fg: str, shape: str, bg: str, width: int, height: int, rng: random.Random):
    """One image: a solid background and one filled shape covering 35-70% of the short edge."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), PALETTE[bg])
    short = min(width, height)
    size = rng.uniform(0.35, 0.7) * short
    cx = rng.uniform(size / 2, width - size / 2)
    cy = rng.uniform(size / 2, height - size / 2)
    paint_shape(ImageDraw.Draw(img), shape, cx, cy, size / 2, PALETTE[fg])
    return img
