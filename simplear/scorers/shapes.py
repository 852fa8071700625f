"""The demo's benchmark: a demo_shapes picture read back with the rewards' classical readers (nearest palette
colour per pixel, the shape templates of `shape_match`), judged against its caption's grammar.

Two figures, kept apart because GRPO trains the colours (color_match) and not the shapes: colour attribution
(the background and the shape both in the caption's colours, not swapped) and the shape (the figure drawn in
the colour found for it is the caption's shape, whatever that colour). `score` is 1 when both are right.
"""

from __future__ import annotations

from typing import Sequence

import torch

from simplear.demo_captions import parse_caption
from simplear.rewards import ColorMatchReward, ColorMatchRewardConfig, as_image_list, shape_of_mask
from simplear.scorers.base import EvalItem, Scorer, ShapesConfig, check_lengths


def _most_common(labels: torch.Tensor) -> int | None:
    labels = labels[labels >= 0]
    return int(labels.bincount().argmax()) if labels.numel() else None


class ShapesScorer(Scorer):
    """Items are demo captions ("a red circle on a blue background"); other prompts score None."""

    name = "shapes"
    figures = ("colour_attribution", "shape_correct")  # each alone; `score` is both, `categories` the caption's shape

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()
        self.colours = ColorMatchReward(ColorMatchRewardConfig(border=self.config.border,
                                                               max_distance=self.config.max_distance))

    def read(self, image_3HW: torch.Tensor) -> dict:
        """What the picture shows: the border ring's commonest colour is the background; the commonest other
        colour anywhere is the shape's; the shape is read from that colour's pixels."""
        names = self.colours.colour_names
        labels = self.colours.assign(image_3HW)
        bg = _most_common(labels[self.colours.border_mask(*labels.shape)])
        fg = _most_common(labels[labels != bg]) if bg is not None else None
        return {
            "background": None if bg is None else names[bg],
            "foreground": None if fg is None else names[fg],
            "shape": None if fg is None else shape_of_mask((labels == fg).numpy()),
        }

    def score(self, images, items: Sequence[EvalItem]) -> list[dict]:
        check_lengths(images, items)
        records = []
        for image, item in zip(as_image_list(images), items):
            parsed = parse_caption(item.prompt)
            if parsed is None:
                records.append({"id": item.id, "prompt": item.prompt, "score": None, "category": None})
                continue
            fg, shape, bg = parsed
            seen = self.read(image)
            colours_ok = seen["background"] == bg and seen["foreground"] == fg
            shape_ok = seen["shape"] == shape
            records.append({
                "id": item.id, "prompt": item.prompt, "score": float(colours_ok and shape_ok), "category": shape,
                "colour_attribution": colours_ok, "shape_correct": shape_ok, "seen": seen,
                "expected": {"background": bg, "foreground": fg, "shape": shape},
            })
        return records
