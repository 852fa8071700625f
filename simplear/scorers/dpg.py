"""DPG-Bench (ELLA, Hu et al. 2024: github.com/TencentQQGYLab/ELLA, `dpg_bench/`) with a VQA judge that is NOT
the official one (see `simplear.vqa_judge`): figures compare runs scored here, not published numbers.

The release's `dpg_bench.csv` has one row per question: item_id, text (the prompt), keywords, proposition_id,
dependency (the parent proposition ids, comma-separated, 0 for none), category_broad, category_detailed, tuple
("entity - whole (cat)"), question_natural_language. Each prompt's image is a 2x2 grid of four samples.

Rules of its `compute_dpg_bench.py` (read at ELLA commit 3c228f1):
- every question is asked on every tile; a question scores 1 for "yes"; then, in file order, a question with a
  parent that scored 0 scores 0 (so a "no" propagates down the chain);
- a tile's score is the mean over the prompt's questions, the prompt's the mean over its tiles, the benchmark's
  the mean over prompts (printed x100 there, in [0, 1] here);
- categories come from the tuple: the text before "(" ("entity - whole") and, broader, before "-" ("entity").
  Its category scores are the raw answers on the last tile asked, before the parent rule, which
  `category_scores: official` reproduces; `all_tiles` uses the scores after the rule, over all tiles.
Deviation: the official script skips the first data row (`if i == 0: continue` after pandas has read the
header), losing the first item's first question; here every row is read.
"""

from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path
from typing import Sequence

from simplear.config import StrictModel
from simplear.scorers.base import DpgConfig, EvalItem, Scorer, as_pil_images, by_category, check_lengths, mean_se
from simplear.vqa_judge import YesNoJudge

log = logging.getLogger("simplear.scorers.dpg")

COLUMNS = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")


class DpgQuestion(StrictModel):
    id: int
    question: str
    parents: list[int]  # proposition ids; 0 means none
    category: str  # "entity - whole"


def broad_category(category: str) -> str:
    """DPG's level-1 category: "entity" of "entity - whole"."""
    return category.split("-")[0].strip()


def load_items(csv_path: str | Path) -> list[EvalItem]:
    """dpg_bench.csv -> one item per prompt (id: item_id, the name of its grid image), questions in file order."""
    grouped: dict[str, tuple[str, list[DpgQuestion]]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: not DPG-Bench's questions file, no column {missing}")
        for row in reader:
            question = DpgQuestion(id=int(row["proposition_id"]), question=row["question_natural_language"],
                                   parents=[int(p) for p in row["dependency"].split(",")],
                                   category=row["tuple"].split("(")[0].strip())
            grouped.setdefault(row["item_id"], (row["text"], []))[1].append(question)
    items = []
    for item_id, (prompt, questions) in grouped.items():
        ids = {q.id for q in questions}
        dangling = sorted({p for q in questions for p in q.parents if p and p not in ids})
        if dangling:
            raise ValueError(f"{csv_path}: item {item_id} has parents {dangling} that are none of its questions")
        items.append(EvalItem(prompt=prompt, id=item_id,
                              metadata={"item_id": item_id, "questions": [q.model_dump() for q in questions]}))
    return items


def apply_parent_rule(answers: dict[int, float], parents: dict[int, list[int]]) -> dict[int, float]:
    """Scores after zeroing each question one of whose parents scored 0, in the order of `parents`."""
    scores = dict(answers)
    for qid, ps in parents.items():
        if any(p and scores[p] == 0 for p in ps):
            scores[qid] = 0.0
    return scores


def grid_tiles(image, n: int = 4) -> list:
    """The first n tiles of a 2x2 grid image, in DPG's order: top left, top right, bottom left, bottom right."""
    w, h = image.width // 2, image.height // 2
    boxes = [(0, 0, w, h), (w, 0, 2 * w, h), (0, h, w, 2 * h), (w, h, 2 * w, 2 * h)]
    return [image.crop(b) for b in boxes[:n]]


def make_grid(images: Sequence):
    """Four same-size PIL images as DPG's 2x2 grid (the image each prompt is scored on)."""
    from PIL import Image

    if len(images) != 4 or len({i.size for i in images}) != 1:
        raise ValueError(f"a DPG grid takes 4 images of one size, got {[i.size for i in images]}")
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((k % 2) * w, (k // 2) * h))
    return grid


class DpgScorer(Scorer):
    """Items carry DPG's questions (`load_items`); items without them score None. `judge`: any YesNoJudge (the
    config's Qwen2-VL when not given)."""

    name = "dpg"

    def __init__(self, config: DpgConfig, judge: YesNoJudge | None = None):
        if judge is None:
            from simplear.vqa_judge import QwenVlJudge

            judge = QwenVlJudge(config.judge)
        self.config, self.judge = config, judge

    def score(self, images, items: Sequence[EvalItem]) -> list[dict]:
        check_lengths(images, items)
        return [self.score_one(image, item) for image, item in zip(as_pil_images(images), items)]

    def score_one(self, image, item: EvalItem) -> dict:
        if not item.metadata.get("questions"):
            return {"id": item.id, "prompt": item.prompt, "score": None, "category": None}
        questions = [DpgQuestion.model_validate(q) for q in item.metadata["questions"]]
        tiles = grid_tiles(image, self.config.tiles)
        p_yes = self.judge.p_yes([t for t in tiles for _ in questions], [q.question for _ in tiles for q in questions])
        p_TQ = [p_yes[t * len(questions): (t + 1) * len(questions)] for t in range(len(tiles))]
        parents = {q.id: q.parents for q in questions}
        ruled_TQ = []
        for p_Q in p_TQ:
            ruled = apply_parent_rule({q.id: float(p > 0.5) for q, p in zip(questions, p_Q)}, parents)
            ruled_TQ.append([ruled[q.id] for q in questions])
        tile_scores = [statistics.fmean(r) for r in ruled_TQ]
        return {
            "id": item.id, "prompt": item.prompt, "score": statistics.fmean(tile_scores), "category": None,
            "tile_scores": tile_scores, "judge": self.judge.name,
            "questions": [{"id": q.id, "question": q.question, "category": q.category,
                           "p_yes": [p_TQ[t][k] for t in range(len(tiles))],
                           "scores": [ruled_TQ[t][k] for t in range(len(tiles))]} for k, q in enumerate(questions)],
        }

    def aggregate(self, per_image: Sequence[dict]) -> dict:
        """overall: the DPG-Bench score; categories: the broad ones (entity, attribute, relation, global, other);
        subcategories: the tuple's "entity - whole"."""
        scored = [r for r in per_image if r["score"] is not None]
        if self.config.category_scores == "official":
            value = lambda q: float(q["p_yes"][-1] > 0.5)  # noqa: E731
        else:
            value = lambda q: statistics.fmean(q["scores"])  # noqa: E731
        values = [(q["category"], value(q)) for r in scored for q in r["questions"]]
        return {
            "overall": mean_se([r["score"] for r in scored]),
            "categories": by_category((broad_category(c), v) for c, v in values),
            "subcategories": by_category(values),
            "unscored": len(per_image) - len(scored),
        }
