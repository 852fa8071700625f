"""GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) with transformers and open_clip, without mmdet.

GenEval's rules as its `evaluation/evaluate_images.py` applies them (read at commit af4902f):
- detections per class above 0.3 (0.9 for `counting`), the most confident first (equal scores: the later
  first), at most 16 per class; a less confident box overlapping a kept one by IoU >= `max_overlap` is dropped,
  which its default (1) never does; scores, boxes and positions are compared in float32, as its mmdet arrays are;
- each `include` clause {class, count, color?, position?} needs `count` objects of the class; colour and
  position are judged on the `count` most confident ones only; `exclude` clauses {class, count} fail when that
  many are found (counting: "three" also means not four); clauses combine with AND;
- colour: CLIP ViT-L-14 (openai) zero-shot over ten colours on the object's box crop with the pixels outside
  its mask painted #999, three prompt templates averaged per colour;
- position: centre offset between the two boxes, each axis shrunk by 0.1 x the summed box sizes; a relation
  holds when its axis carries more than half of the (unshrunk) offset's length;
- the score of a task is its share of correct images; the overall score is the mean of the task scores.

The detector is the transformers port of Mask2Former (Swin-S, COCO instances), fed as GenEval's mmdet test
pipeline feeds it (short side 800, long side at most 1333) and post-processed as mmdet's
`MaskFormerFusionHead.instance_postprocess`: the top num_queries (query, class) pairs, score = class
probability x mean mask probability inside the mask, box = the mask's bounding box. Its weights are the
detectron2 release's, not the mmdet checkpoint GenEval downloads, so scores can differ from GenEval's own:
`scripts/compare_geneval.py` compares two results.jsonl files image by image.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from simplear.scorers.base import EvalItem, GenEvalConfig, Scorer, as_pil_images, by_category, check_lengths

log = logging.getLogger("simplear.scorers.geneval")

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}", "a photo of a {colour} object")
# GenEval's object_names.txt calls three COCO classes otherwise than the COCO labels detectors carry
GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
RESULT_FIELDS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")  # results.jsonl
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (mmdet's mask2bbox: x2, y2 one past the mask)
    score: float
    mask: Any = None  # (H, W) bool array, or None


# -- the rules, over detections ----------------------------------------------------------------


def box_iou(a, b) -> float:
    """IoU counting boxes in whole pixels, corners included (GenEval's convention), in float32 as its mmdet boxes."""
    a, b = np.asarray(a[:4], dtype=np.float32), np.asarray(b[:4], dtype=np.float32)
    zero = np.float32(0)
    area = lambda x1, y1, x2, y2: max(x2 - x1 + 1, zero) * max(y2 - y1 + 1, zero)  # noqa: E731
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return float(inter / union) if union else 0.0


def confidence_order(scores: Sequence[float], threshold: float) -> list[int]:
    """Indices of the scores above `threshold`, the most confident first, as GenEval orders them: in float32 (its
    mmdet scores; a score of float32(0.3) is not above 0.3) and, among equal scores, the later first (numpy's
    `argsort(...)[::-1]` over a stable order, which numpy's sort gives for up to 16 values and for ties in general
    is not promised)."""
    s = np.asarray(scores, dtype=np.float32)
    order = sorted(range(len(s)), key=lambda i: (s[i], i), reverse=True)
    return [i for i in order if s[i] > np.float32(threshold)]


def keep_detections(candidates: dict[str, list[Detection]], tag: str, config: GenEvalConfig) -> dict[str, list[Detection]]:
    """The detections GenEval reasons about, per class, most confident first; classes with none are left out."""
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    kept = {}
    for name, detections in candidates.items():
        ranked = [detections[i] for i in confidence_order([d.score for d in detections], threshold)][: config.max_objects]
        chosen = []
        while ranked:
            best = ranked.pop(0)
            chosen.append(best)
            if config.max_overlap < 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < config.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a, b, margin: float) -> set[str]:
    """Where box a lies relative to box b: a subset of {left of, right of, above, below} (y grows downwards).
    Computed in float32 as GenEval computes it on its boxes, so a relation at the boundary is decided as there."""
    f = np.float32
    boxes = np.asarray([a[:4], b[:4]], dtype=f).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - f(margin) * (dim_a + dim_b), f(0)) * np.sign(offset)
    if np.all(np.abs(shrunk) < f(1e-3)):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < f(-0.5):
        relations.add("left of")
    if dx > f(0.5):
        relations.add("right of")
    if dy < f(-0.5):
        relations.add("above")
    if dy > f(0.5):
        relations.add("below")
    return relations


def evaluate_metadata(detected: dict[str, list[Detection]], metadata: dict,
                      colours_of: Callable[[str, list[Detection]], list[str]], margin: float = 0.1) -> tuple[bool, str]:
    """(correct, reason) of one image. `colours_of(class, detections)` names each detection's colour; it is only
    asked about clauses that have a colour and enough objects."""
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []  # per include clause: its objects, or None when it failed
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detected.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            colours = colours_of(name, found)
            if colours.count(clause["color"]) < count:
                ok = False
                seen = ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours)
                reasons.append(f"expected {clause['color']} {name}>={count}, found {colours.count(clause['color'])} "
                               f"{clause['color']}; and {seen}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                wrong = next((rel for obj in found for other in groups[target]
                              if relation not in (rel := relative_position(obj.box, other.box, margin))), None)
                if wrong is not None:
                    ok = False
                    reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(wrong))} target")
        correct &= ok
        groups.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        n = len(detected.get(clause["class"], []))
        if n >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return correct, "\n".join(reasons)


# -- results.jsonl -----------------------------------------------------------------------------


def load_items(metadata_jsonl: str | Path, samples_per_prompt: int = 4) -> list[EvalItem]:
    """GenEval's evaluation_metadata.jsonl -> one item per image to generate, each named as GenEval lays images
    out (`{prompt:05d}/samples/{sample:04d}.png`), so results.jsonl filenames line up with GenEval's own."""
    lines = [json.loads(line) for line in Path(metadata_jsonl).read_text().splitlines() if line.strip()]
    return [EvalItem(prompt=meta["prompt"], id=f"{p:05d}/samples/{s:04d}.png", metadata=meta)
            for p, meta in enumerate(lines) for s in range(samples_per_prompt)]


def read_results(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize_results(records: Sequence[dict]) -> dict:
    """Task scores and their mean (the overall score) as GenEval's summary_scores.py computes them, with standard
    errors; the overall's treats the tasks as independent samples. Tasks with no image are listed as missing."""
    tasks = by_category((r["tag"], float(r["correct"])) for r in records)
    means = [t["mean"] for t in tasks.values()]
    ses = [t["se"] for t in tasks.values()]
    prompts: dict[str, bool] = {}
    for r in records:
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    return {
        "overall": {
            "mean": statistics.fmean(means) if means else None,
            "se": math.sqrt(sum(s * s for s in ses)) / len(ses) if ses and None not in ses else None,
            "count": len(records),
        },
        "categories": tasks,
        "tasks_missing": [t for t in TASKS if t not in tasks],
        "correct_images": statistics.fmean(float(r["correct"]) for r in records) if records else None,
        "correct_prompts": statistics.fmean(prompts.values()) if prompts else None,
        "prompts": len(prompts),
    }


def image_key(filename: str) -> str:
    """What names one image in both GenEval's results (absolute paths) and ours: `prompt/sample`."""
    m = re.search(r"(\d+)[/\\]samples[/\\](\d+)\.\w+$", filename)
    return f"{int(m[1])}/{int(m[2])}" if m else filename


def compare_results(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """Two results.jsonl (e.g. GenEval's own and ours on the same images): each one's summary, and image by image
    on the images both scored, how often `correct` agrees, overall and per task, and where it does not."""
    by_a, by_b = {image_key(r["filename"]): r for r in a}, {image_key(r["filename"]): r for r in b}
    common = [k for k in by_a if k in by_b]
    agree = by_category((by_a[k]["tag"], float(bool(by_a[k]["correct"]) == bool(by_b[k]["correct"]))) for k in common)
    disagreements = [
        {"image": k, "tag": by_a[k]["tag"], "prompt": by_a[k]["prompt"], "a": bool(by_a[k]["correct"]),
         "b": bool(by_b[k]["correct"]), "reason_a": by_a[k]["reason"], "reason_b": by_b[k]["reason"]}
        for k in common if bool(by_a[k]["correct"]) != bool(by_b[k]["correct"])
    ]
    return {
        "a": summarize_results(a),
        "b": summarize_results(b),
        "common": len(common),
        "only_a": len(by_a) - len(common),
        "only_b": len(by_b) - len(common),
        "agreement": (len(common) - len(disagreements)) / len(common) if common else None,
        "agreement_by_task": {t: s["mean"] for t, s in agree.items()},
        "disagreements": disagreements,
    }


# -- the scorer --------------------------------------------------------------------------------


class GenEvalScorer(Scorer):
    """Items carry GenEval's metadata line; items without one (`include`) score None."""

    name = "geneval"

    def __init__(self, config: GenEvalConfig):
        from simplear.devices import resolve_device
        from simplear.rewards import ClipReward
        from simplear.scorers.geneval_models import ClipColourClassifier, Mask2FormerDetector

        self.config = config
        self.detector = Mask2FormerDetector(config.detector, resolve_device(config.device), config.detector_resize)
        self.colours = ClipColourClassifier(ClipReward(config.colour_clip), COLOURS, COLOUR_TEMPLATES, config.crop_background)

    def score(self, images, items: Sequence[EvalItem]) -> list[dict]:
        check_lengths(images, items)
        pil = as_pil_images(images)
        records: list[dict] = [{"id": i.id, "prompt": i.prompt, "score": None, "category": None} for i in items]
        todo = [n for n, item in enumerate(items) if item.metadata.get("include")]
        min_score = min(self.config.threshold, self.config.counting_threshold)
        for start in range(0, len(todo), self.config.batch_size):
            chunk = todo[start: start + self.config.batch_size]
            found = self.detector.detect([pil[n] for n in chunk], min_score=min_score)
            for n, candidates in zip(chunk, found):
                records[n] = self.judge(pil[n], items[n], candidates)
        log.info("GenEval: %d of %d images have metadata and were judged", len(todo), len(items))
        return records

    def judge(self, image, item: EvalItem, candidates: dict[str, list[Detection]]) -> dict:
        meta = item.metadata
        unknown = {c["class"] for c in meta["include"] + meta.get("exclude", [])} - set(self.detector.class_names)
        if unknown:
            raise ValueError(f"GenEval item {item.id or item.prompt!r}: the detector has no class {sorted(unknown)}")
        detected = keep_detections(candidates, meta["tag"], self.config)
        correct, reason = evaluate_metadata(detected, meta, lambda name, dets: self.colours.classify(image, dets, name),
                                            self.config.position_margin)
        return {
            "id": item.id, "filename": item.id or "", "tag": meta["tag"], "prompt": meta.get("prompt", item.prompt),
            "correct": correct, "reason": reason, "metadata": json.dumps(meta),
            "details": json.dumps({k: [[*d.box, d.score] for d in v] for k, v in detected.items()}),
            "score": float(correct), "category": meta["tag"],
        }

    def aggregate(self, per_image: Sequence[dict]) -> dict:
        scored = [r for r in per_image if r["score"] is not None]
        return {**summarize_results(scored), "unscored": len(per_image) - len(scored)}

    def records(self, per_image: Sequence[dict]) -> dict[str, str]:
        """results.jsonl in GenEval's format, which its summary_scores.py and scripts/compare_geneval.py read."""
        rows = [{k: r[k] for k in RESULT_FIELDS} for r in per_image if r["score"] is not None]
        return {RESULTS: "".join(json.dumps(r) + "\n" for r in rows)}

