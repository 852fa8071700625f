"""Image rewards behind one interface: `reward(images, prompts) -> list[float | None]`, higher is better.

- `clip`: cosine similarity of the normalised open_clip image and text embeddings; the text is the
  caption itself, untouched (the reference code strips its prompt template with a character-set
  strip that also eats letters of the caption). Production: ViT-H-14 with laion2b weights.
- `hps`: HPSv2-style, i.e. the same score from a CLIP fine-tuned on human preferences, loaded from a
  checkpoint path (HPSv2 releases a ViT-H-14 state dict, `HPS_v2.1_compressed.pt`).
- `color_match`: for the demo set (pipelines/demo_shapes.py), how well the image's colours match the
  colour words of the prompt: the background colour on the image border, the shape colour inside.

`images` is a float tensor (B, 3, H, W) in [-1, 1] (what visual tokenizers decode) or a list of PIL
images. `None` means "cannot score this one" (trl turns it into NaN and leaves it out of the
group statistics). `WeightedRewards` combines several rewards with weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field

from simplear.config import StrictModel
from simplear.devices import resolve_device
from simplear.tiny import TINY_CLIP, TINY_CLIP_NAME

# -- configs -----------------------------------------------------------------------------------


class ClipRewardConfig(StrictModel):
    kind: Literal["clip"] = "clip"
    weight: float = 1.0
    model: str = "ViT-H-14"  # an open_clip architecture name, "local-dir:/path" (open_clip_config.json + weights), or simplear-tiny-clip
    pretrained: str | None = "laion2b_s32b_b79k"  # an open_clip tag, a local weights file, or None (random: tests)
    model_config_file: str | None = None  # JSON architecture registered with open_clip.add_model_config (tiny models)
    checkpoint: str | None = None  # a state dict loaded over the model (fine-tuned CLIPs)
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    batch_size: int = Field(32, ge=1)


class HpsRewardConfig(ClipRewardConfig):
    """HPSv2: ViT-H-14 architecture, weights from the HPS checkpoint (not laion2b)."""

    kind: Literal["hps"] = "hps"  # type: ignore[assignment]
    pretrained: str | None = None
    checkpoint: str  # type: ignore[assignment]  # required: e.g. /models/HPS_v2.1_compressed.pt


class ColorMatchRewardConfig(StrictModel):
    kind: Literal["color_match"] = "color_match"
    weight: float = 1.0
    border: float = Field(0.125, gt=0, lt=0.5)  # width of the border ring, as a fraction of each side
    fg_target: float = Field(0.1, gt=0, le=1)  # interior fraction of the shape colour that counts as fully present
    max_distance: float = Field(80.0, gt=0)  # RGB distance beyond which a pixel matches no palette colour


class ShapeMatchRewardConfig(StrictModel):
    kind: Literal["shape_match"] = "shape_match"
    weight: float = 1.0
    max_distance: float = Field(80.0, gt=0)  # RGB distance beyond which a pixel is not the shape's colour


RewardConfig = Annotated[Union[ClipRewardConfig, HpsRewardConfig, ColorMatchRewardConfig, ShapeMatchRewardConfig],
                         Field(discriminator="kind")]


# -- interface ---------------------------------------------------------------------------------


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images, prompts: Sequence[str]) -> list[float | None]: ...


def as_image_list(images) -> list[torch.Tensor]:
    """A (B, 3, H, W) tensor in [-1, 1], or PIL images -> a list of (3, H, W) float tensors in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return list(images.float())
    from simplear.visual_tokenizers import pil_to_tensor

    return [img.float() if isinstance(img, torch.Tensor) else pil_to_tensor(img) for img in images]


# -- clip / hps --------------------------------------------------------------------------------


def _tiny_clip():
    """The built-in tiny CLIP (`simplear.tiny.TINY_CLIP`), its random weights the same in every process."""
    import json
    import tempfile

    import open_clip

    with tempfile.TemporaryDirectory(prefix="simplear-clip-") as d:  # open_clip registers configs from files
        path = Path(d) / f"{TINY_CLIP_NAME}.json"
        path.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(TINY_CLIP_NAME, pretrained=None, device="cpu")


class ClipReward:
    """Cosine of normalised open_clip embeddings of the image and of the caption itself."""

    def __init__(self, config: ClipRewardConfig):
        import open_clip

        self.config = config
        self.name = config.kind
        if config.model_config_file:
            path = Path(config.model_config_file)
            if not path.is_file():
                raise FileNotFoundError(f"open_clip model config not found: {path}")
            open_clip.add_model_config(path)
        self.device = resolve_device(config.device)
        if config.model == TINY_CLIP_NAME:
            model = _tiny_clip()
        else:
            model = open_clip.create_model(config.model, pretrained=config.pretrained, device="cpu")
        if config.checkpoint:
            if not Path(config.checkpoint).is_file():
                raise FileNotFoundError(f"{self.name} reward checkpoint not found: {config.checkpoint}")
            # open_clip's loader takes HPSv2's {"state_dict": ...} and strips DDP's "module." prefixes
            open_clip.load_checkpoint(model, config.checkpoint)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.tokenizer = open_clip.get_tokenizer(config.model)
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(3, 1, 1)
        self.std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD)).view(3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}

    def preprocess(self, image_3HW: torch.Tensor) -> torch.Tensor:
        """open_clip's eval transform on a tensor: resize the short side (bicubic), centre-crop, normalise."""
        x = ((image_3HW.float().clamp(-1, 1) + 1) / 2)[None]
        th, tw = self.size
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=nh < h or nw < w)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top: top + th, left: left + tw].clamp(0, 1)[0]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for i in range(0, len(missing), self.config.batch_size):
            chunk = missing[i: i + self.config.batch_size]
            tokens = self.tokenizer(list(chunk)).to(self.device)
            feats = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._text_cache.update(zip(chunk, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        batch = torch.stack([self.preprocess(img) for img in as_image_list(images)])
        out = []
        for i in range(0, len(batch), self.config.batch_size):
            x = batch[i: i + self.config.batch_size].to(self.device, self.dtype)
            out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out)

    def __call__(self, images, prompts: Sequence[str]) -> list[float | None]:
        prompts = list(prompts)
        img = self.image_features(images)
        if len(img) != len(prompts):
            raise ValueError(f"{len(img)} images but {len(prompts)} prompts")
        return (img * self.text_features(prompts)).sum(-1).tolist()


# -- color_match -------------------------------------------------------------------------------


def _palette() -> dict[str, tuple[int, int, int]]:
    from simplear.demo_captions import PALETTE

    return PALETTE


def colour_words(prompt: str) -> list[str]:
    """Palette colour names in the prompt, in order of appearance, without repeats."""
    palette = _palette()
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w in palette))


class ColorMatchReward:
    """Demo captions "a red circle on a blue background": 1/2 * (fraction of the border ring that is
    the background colour) + 1/2 * min(1, fraction of the interior that is the shape colour / fg_target).

    Each pixel takes the nearest palette colour, or none beyond `max_distance`. A prompt that is not a
    demo caption but names palette colours scores the mean presence of each colour over the whole image
    (min(1, fraction / fg_target)); a prompt with no colour word scores None.
    """

    name = "color_match"

    def __init__(self, config: ColorMatchRewardConfig | None = None):
        self.config = config or ColorMatchRewardConfig()
        palette = _palette()
        self.colour_names = list(palette)
        self.rgb = torch.tensor([palette[c] for c in self.colour_names], dtype=torch.float32)  # (P, 3)

    def assign(self, image_3HW: torch.Tensor) -> torch.Tensor:
        """(H, W) index of the nearest palette colour per pixel, -1 where none is within max_distance."""
        rgb = ((image_3HW.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)  # (H, W, 3) in [0, 255]
        d = torch.cdist(rgb.reshape(-1, 3), self.rgb)  # (H*W, P)
        dist, idx = d.min(-1)
        idx[dist > self.config.max_distance] = -1
        return idx.view(rgb.shape[:2])

    def border_mask(self, h: int, w: int) -> torch.Tensor:
        bh, bw = max(1, round(h * self.config.border)), max(1, round(w * self.config.border))
        mask = torch.ones(h, w, dtype=torch.bool)
        mask[bh: h - bh, bw: w - bw] = False
        return mask

    def score_one(self, image_3HW: torch.Tensor, prompt: str) -> float | None:
        from simplear.demo_captions import parse_caption

        labels = self.assign(image_3HW)
        presence = lambda frac: min(1.0, frac / self.config.fg_target)  # noqa: E731
        parsed = parse_caption(prompt)
        if parsed is not None:
            fg, _, bg = parsed
            border = self.border_mask(*labels.shape)
            bg_frac = (labels[border] == self.colour_names.index(bg)).float().mean().item()
            inner = labels[~border]
            fg_frac = (inner == self.colour_names.index(fg)).float().mean().item() if inner.numel() else 0.0
            return 0.5 * bg_frac + 0.5 * presence(fg_frac)
        colours = colour_words(prompt)
        if not colours:
            return None
        fracs = [(labels == self.colour_names.index(c)).float().mean().item() for c in colours]
        return sum(presence(f) for f in fracs) / len(fracs)

    def __call__(self, images, prompts: Sequence[str]) -> list[float | None]:
        imgs = as_image_list(images)
        if len(imgs) != len(prompts):
            raise ValueError(f"{len(imgs)} images but {len(prompts)} prompts")
        return [self.score_one(img, p) for img, p in zip(imgs, prompts)]


# -- shape_match -------------------------------------------------------------------------------


def shape_of_mask(mask) -> str | None:
    """The demo shape that, drawn in the (H, W) bool mask's bounding box as the demo set draws it, overlaps the
    mask best (IoU); None under 4 pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    from simplear.demo_captions import SHAPES, paint_shape

    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    best, best_iou = None, -1.0
    for shape in SHAPES:
        template = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
        paint_shape(ImageDraw.Draw(template), shape, cx, cy, r, 255)
        t = np.asarray(template) > 0
        iou = (t & mask).sum() / max(1, (t | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


class ShapeMatchReward:
    """Demo captions: 1 when the shape drawn in the caption's colour is the caption's shape, else 0 (None for
    other prompts). The pixels nearest the shape colour form a mask; each of the five shapes is drawn in
    the mask's bounding box (as the demo set draws them) and the one overlapping it best (IoU) is the
    shape seen. A score GRPO's colour reward does not train, for the held-out evaluation."""

    name = "shape_match"

    def __init__(self, config: ShapeMatchRewardConfig | None = None):
        self.config = config or ShapeMatchRewardConfig()
        self.colours = ColorMatchReward(ColorMatchRewardConfig(max_distance=self.config.max_distance))

    def seen_shape(self, image_3HW: torch.Tensor, colour: str) -> str | None:
        return shape_of_mask((self.colours.assign(image_3HW) == self.colours.colour_names.index(colour)).numpy())

    def __call__(self, images, prompts: Sequence[str]) -> list[float | None]:
        from simplear.demo_captions import parse_caption

        out: list[float | None] = []
        for image, prompt in zip(as_image_list(images), prompts):
            parsed = parse_caption(prompt)
            out.append(None if parsed is None else float(self.seen_shape(image, parsed[0]) == parsed[1]))
        return out


# -- building and combining --------------------------------------------------------------------


def build_reward(config) -> Reward:
    if isinstance(config, dict):
        from pydantic import TypeAdapter

        config = TypeAdapter(RewardConfig).validate_python(config)
    if isinstance(config, ColorMatchRewardConfig):
        return ColorMatchReward(config)
    if isinstance(config, ShapeMatchRewardConfig):
        return ShapeMatchReward(config)
    if isinstance(config, ClipRewardConfig):  # clip and hps
        return ClipReward(config)
    raise TypeError(f"not a reward config: {config!r}")


class WeightedRewards:
    """Several rewards and their weights; `total` is the weighted sum over the rewards that scored an image
    (None where none did), the same rule as trl's `sum_then_normalize` with NaN for unscored rows."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        if not rewards or len(rewards) != len(weights):
            raise ValueError(f"need one weight per reward, at least one reward (got {len(rewards)} and {len(weights)})")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        names = [r.name for r in self.rewards]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    @classmethod
    def from_configs(cls, configs: Sequence) -> WeightedRewards:
        """From reward configs (models or dicts, each with its `weight`)."""
        from pydantic import TypeAdapter

        adapter = TypeAdapter(RewardConfig)
        configs = [adapter.validate_python(c) if isinstance(c, dict) else c for c in configs]
        return cls([build_reward(c) for c in configs], [c.weight for c in configs])

    def score(self, images, prompts: Sequence[str]) -> dict[str, list[float | None]]:
        """Per reward name, plus "total"."""
        out = {name: reward(images, prompts) for name, reward in zip(self.names, self.rewards)}
        totals = []
        for i in range(len(prompts)):
            parts = [(w, out[n][i]) for n, w in zip(self.names, self.weights) if out[n][i] is not None]
            totals.append(sum(w * s for w, s in parts) if parts else None)
        out["total"] = totals
        return out

    def describe(self) -> str:
        return json.dumps(dict(zip(self.names, self.weights)))
