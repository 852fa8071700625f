"""GenEval's two models, apart from its rules so that the rules are tested without them: the instance detector
(a transformers Mask2Former) and the colour classifier (CLIP zero-shot through the CLIP reward's model code)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from simplear.scorers.geneval import GENEVAL_NAMES, Detection

log = logging.getLogger("simplear.scorers.geneval")


def mask_boxes(masks_QHW: torch.Tensor) -> torch.Tensor:
    """(Q, 4) x1, y1, x2, y2 of each bool mask, x2/y2 one past its last pixel (mmdet's mask2bbox); zeros if empty."""
    q, h, w = masks_QHW.shape
    cols, rows = masks_QHW.any(1), masks_QHW.any(2)  # (Q, W), (Q, H)
    x1 = cols.float().argmax(1)
    x2 = w - cols.flip(1).float().argmax(1)
    y1 = rows.float().argmax(1)
    y2 = h - rows.flip(1).float().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    boxes[~cols.any(1)] = 0
    return boxes


def instances(class_logits_QK: torch.Tensor, mask_logits_QHW: torch.Tensor, class_names: Sequence[str],
              min_score: float = 0.0) -> dict[str, list[Detection]]:
    """mmdet's instance post-processing of one image's Mask2Former outputs (K = classes + "no object"; masks at
    the image's size): the Q best (query, class) pairs by class probability, each scored by that probability
    times the mean mask probability inside its mask; those above `min_score`, grouped by class name."""
    probs_QC = class_logits_QK.float().softmax(-1)[:, :-1]
    q, c = probs_QC.shape
    top, index = probs_QC.flatten().topk(q)
    query, label = index // c, index % c
    logits = mask_logits_QHW[query].float()
    masks = logits > 0
    mask_prob = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = top * mask_prob
    boxes = mask_boxes(masks)
    found: dict[str, list[Detection]] = {}
    for j in (scores > min_score).nonzero().flatten().tolist():
        found.setdefault(class_names[label[j]], []).append(
            Detection(tuple(boxes[j].tolist()), scores[j].item(), masks[j].cpu().numpy()))
    return found


class Mask2FormerDetector:
    """A transformers Mask2Former for instance segmentation, from a hub id or a folder; class names from its
    config's id2label, with GenEval's names for the three COCO classes it renames."""

    def __init__(self, source: str, device: torch.device, resize: tuple[int, int] | None = None):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(source)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(source).to(device).eval()
        id2label = self.model.config.id2label
        self.class_names = [GENEVAL_NAMES.get(id2label[i], id2label[i]) for i in range(len(id2label))]
        # the short side to resize[0] unless the long one would pass resize[1]: mmdet's Resize with keep_ratio
        self.size = {"shortest_edge": resize[0], "longest_edge": resize[1]} if resize else None
        log.info("GenEval detector %s: %d classes, resize %s", source, len(self.class_names), resize or "processor's")

    @torch.no_grad()
    def detect(self, images: Sequence, min_score: float = 0.0) -> list[dict[str, list[Detection]]]:
        """Per RGB PIL image, its detections above `min_score` by class name, in the image's pixel coordinates."""
        inputs = self.processor(images=list(images), return_tensors="pt", **({"size": self.size} if self.size else {}))
        pixel_values, pixel_mask = inputs["pixel_values"].to(self.device), inputs["pixel_mask"].to(self.device)
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        results = []
        for i, image in enumerate(images):
            # as mmdet: to the padded input's size, the padding cut off, then to the image's own size
            masks = F.interpolate(out.masks_queries_logits[i][None].float(), size=pixel_values.shape[-2:],
                                  mode="bilinear", align_corners=False)[0]
            valid_h, valid_w = int(pixel_mask[i].any(1).sum()), int(pixel_mask[i].any(0).sum())
            masks = F.interpolate(masks[None, :, :valid_h, :valid_w], size=(image.height, image.width),
                                  mode="bilinear", align_corners=False)[0]
            results.append(instances(out.class_queries_logits[i], masks, self.class_names, min_score))
        return results


class ClipColourClassifier:
    """Zero-shot colour of detected objects: each colour's text embedding is the normalised mean of its prompt
    templates' normalised embeddings (clip_benchmark's zero_shot_classifier, which GenEval calls); each object is
    its box crop with the pixels outside its mask painted `background`."""

    def __init__(self, clip, colours: Sequence[str], templates: Sequence[str], background: str):
        self.clip, self.colours, self.templates, self.background = clip, list(colours), list(templates), background
        self._weights: dict[str, torch.Tensor] = {}

    def weights(self, object_name: str) -> torch.Tensor:
        """(colours, D) normalised class embeddings for one object class."""
        if object_name not in self._weights:
            texts = [t.format(colour=c, object=object_name) for c in self.colours for t in self.templates]
            per_template = self.clip.text_features(texts).view(len(self.colours), len(self.templates), -1)
            self._weights[object_name] = F.normalize(per_template.mean(1), dim=-1)
        return self._weights[object_name]

    def crop(self, image, detection: Detection):
        from PIL import Image

        if detection.mask is not None:
            image = Image.composite(image, Image.new("RGB", image.size, self.background), Image.fromarray(detection.mask))
        return image.crop(tuple(round(v) for v in detection.box))

    def classify(self, image, detections: Sequence[Detection], object_name: str) -> list[str]:
        if not detections:
            return []
        features = self.clip.image_features([self.crop(image, d) for d in detections])
        return [self.colours[k] for k in (features @ self.weights(object_name).T).argmax(-1).tolist()]
