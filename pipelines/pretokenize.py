"""tokenize: images to visual-token codes, one Parquet shard set per target resolution.

Each image is resized and centre-cropped to a square `size` with ADM's `center_crop_arr` (what the
SimpleAR reference uses), scaled to [-1, 1] and encoded by the model core's visual tokenizer
(`simplear.visual_tokenizers`) in a Ray Data actor pool (a GPU per actor in production). An image is
encoded at a resolution only when its short edge is at least that resolution's `min_short_edge`
(default: the size itself, so nothing is upsampled).

Output: `<size>/part-*.parquet` with `key, caption, caption_long, caption_short, tokenizer, height,
width, codes` (codes: int32, raster order, (size/d)^2 of them), `rejected/` for rows that could not
be encoded, and `tokenizer.json` (name, codebook size, grid per resolution) for the training stages.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.resumable_parquet import parts_progress, run_stage, to_arrow
from simplear.config import StrictModel
from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer, pil_to_tensor
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.manifest import atomic_write_json
from simplear.workflow.registry import register_stage

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("caption_long", pa.string()),
        ("caption_short", pa.string()),
        ("tokenizer", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("codes", pa.list_(pa.int32())),
    ]
)
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("error_message", pa.string())])


class Resolution(StrictModel):
    size: int = Field(ge=8, description="side of the square image the codes describe")
    min_short_edge: int | None = Field(None, ge=1, description="default: size (no upsampling)")

    @property
    def name(self) -> str:
        return str(self.size)

    @property
    def threshold(self) -> int:
        return self.min_short_edge if self.min_short_edge is not None else self.size


class TokenizeConfig(StrictModel):
    tokenizer: VisualTokenizerConfig
    resolutions: list[Resolution] = Field(min_length=1)
    batch_size: int = Field(64, ge=1, description="images per encoder forward")
    rows_per_part: int = Field(512, ge=1, description="rows per actor call, so per output part")

    @model_validator(mode="after")
    def _sizes(self):
        sizes = [r.size for r in self.resolutions]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"resolutions: sizes must be distinct, got {sizes}")
        d = self.tokenizer.downsample
        bad = [s for s in sizes if s % d]
        if bad:
            raise ValueError(f"resolutions: sizes {bad} are not multiples of the tokenizer's downsample {d}")
        return self


def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop (guided-diffusion): halve with BOX while the image is >= 2x, BICUBIC to size, crop the middle."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def codes_column(name: str) -> str:
    return f"codes@{name}"


class Encoder:
    """The actor of the pool: one visual tokenizer, called on batches of rows (pandas)."""

    def __init__(self, cfg: TokenizeConfig, cpus: float, writer=None):
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.cfg = cfg
        self.tokenizer = load_visual_tokenizer(cfg.tokenizer)
        self.writer = writer  # writes the output's parts (in the pipeline); None returns the table (tests)

    def encode(self, images: list) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray] = []
        bs = self.cfg.batch_size
        for i in range(0, len(images), bs):
            x_BCHW = torch.stack([pil_to_tensor(im) for im in images[i : i + bs]])
            codes_BHW = self.tokenizer.encode(x_BCHW).cpu()
            assert int(codes_BHW.min()) >= 0 and int(codes_BHW.max()) < self.tokenizer.codebook_size
            out += [c.reshape(-1).numpy().astype(np.int32) for c in codes_BHW]
        return out

    def __call__(self, batch):
        from PIL import Image

        n = len(batch)
        reasons, errors = [None] * n, [None] * n
        codes_by_res: dict[str, list] = {r.name: [None] * n for r in self.cfg.resolutions}
        bs = self.cfg.batch_size
        for start in range(0, n, bs):  # decode one model batch at a time: memory stays bounded by batch_size
            pictures: dict[int, Any] = {}
            for i in range(start, min(n, start + bs)):
                try:
                    with Image.open(io.BytesIO(batch["image"].iloc[i])) as im:
                        pictures[i] = im.convert("RGB")
                except Exception as e:  # noqa: BLE001 - recorded, never raised
                    reasons[i], errors[i] = "undecodable", f"{type(e).__name__}: {e}"
            for res in self.cfg.resolutions:
                idx = [i for i, p in pictures.items() if min(p.size) >= res.threshold]
                column = codes_by_res[res.name]
                try:
                    for i, codes in zip(idx, self.encode([center_crop_arr(pictures[i], res.size) for i in idx])):
                        column[i] = codes
                except Exception:  # noqa: BLE001 - one image at a time to find the bad ones
                    for i in idx:
                        try:
                            column[i] = self.encode([center_crop_arr(pictures[i], res.size)])[0]
                        except Exception as e1:  # noqa: BLE001
                            reasons[i], errors[i] = "encode_error", f"{type(e1).__name__}: {e1}"[:500]
            for i in pictures:
                if reasons[i] is None and all(c[i] is None for c in codes_by_res.values()):
                    reasons[i] = "below_every_resolution"
        batch = batch.drop(columns=["image"])
        batch["reason"], batch["error_message"] = reasons, errors
        batch["tokenizer"] = self.tokenizer.name
        # an Arrow table with typed list columns: a pandas column mixing arrays and None would be pickled by Ray Data
        table = pa.Table.from_pandas(batch, preserve_index=False)
        for name, column in codes_by_res.items():
            table = table.append_column(codes_column(name), pa.array(column, type=pa.list_(pa.int32())))
        return self.writer(table) if self.writer else table


class Split:
    """Rows of one source to `<size>/` tables (those encoded at that size) and `rejected/`."""

    def __init__(self, resolutions: list[Resolution]):
        self.resolutions = resolutions

    def __call__(self, rows) -> dict[str, pa.Table]:
        out = {}
        for res in self.resolutions:
            col = rows[codes_column(res.name)]
            sel = rows[col.notna()].copy()
            sel["codes"] = sel[codes_column(res.name)]
            sel["height"] = res.size
            sel["width"] = res.size
            out[res.name] = to_arrow(sel, SCHEMA)
        out["rejected"] = to_arrow(rows[rows["reason"].notna()], REJECTED_SCHEMA)
        return out


@register_stage("tokenize", TokenizeConfig, version=1, operational=("batch_size", "rows_per_part"), progress=parts_progress)
def run(ctx: StageContext) -> StageResult:
    cfg: TokenizeConfig = ctx.config
    # fails here, before any work, on a bad tokenizer folder; on CPU: the stage task itself holds no GPU
    tok = load_visual_tokenizer(cfg.tokenizer.model_copy(update={"device": "cpu"}))
    info = {
        "name": tok.name,
        "kind": cfg.tokenizer.kind,
        "codebook_size": tok.codebook_size,
        "downsample": tok.downsample,
        "config": cfg.tokenizer.model_dump(mode="json"),
        "resolutions": {
            r.name: {"size": r.size, "min_short_edge": r.threshold, "grid": [r.size // tok.downsample] * 2,
                     "tokens": (r.size // tok.downsample) ** 2}
            for r in cfg.resolutions
        },
    }
    del tok
    folders = [r.name for r in cfg.resolutions] + ["rejected"]
    result = run_stage(
        ctx,
        folders=folders,
        split=Split(cfg.resolutions),
        process=Encoder,
        process_kwargs={"cfg": cfg, "cpus": ctx.resources.cpus},
        batch_size=cfg.rows_per_part,
    )
    atomic_write_json(ctx.stage_dir / "tokenizer.json", info)
    result.metrics.update(tokenizer=info["name"], codebook_size=info["codebook_size"])
    return result


__all__ = ["TokenizeConfig", "Resolution", "center_crop_arr", "SCHEMA"]
