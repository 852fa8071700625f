"""The demo set's caption grammar ("a red circle on a blue background"): its colours and shapes, written and read back.

In the library, not in the demo's data pipeline, because rewards and evaluations read colours back
from captions and the library never imports `pipelines/`.
"""

from __future__ import annotations

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
