"""tokenize: images to visual-token codes, one Parquet shard set per target resolution.

Each image is fetched by reference from the download's shards (`pipelines.pixels`), resized and
centre-cropped to a square `size` with ADM's `center_crop_arr` (what the SimpleAR reference uses)
(`prepare_crops`), then scaled to [-1, 1] and encoded by the model core's visual tokenizer
(`simplear.visual_tokenizers`) in a Ray Data actor pool. With GPUs (production), CPU reader tasks in front
of the GPU actors do the fetch and crop (`prepare:` sets their CPUs and number), so a GPU never waits on a
JPEG decoder; the crops cross the object store, the price of keeping the GPUs busy. On CPUs alone each actor
does whole sources itself (`resumable_parquet.SourceWorker`): reader tasks there would only take cores from
the encoder and ship 0.8 MB per 512 px crop between processes. An image is encoded at a resolution only when
its short edge is at least that resolution's `min_short_edge` (default: the size itself, so nothing is
upsampled).

Output: `<size>/part-*.parquet` with `key, caption, caption_long, caption_short, tokenizer, height,
width, codes` (codes: int32, raster order, (size/d)^2 of them), `rejected/` for rows that could not
be encoded, and `tokenizer.json` (name, codebook size, grid per resolution) for the training stages.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.pixels import check_pixel_files, from_raw_rgb, open_images, pixel_files, raw_rgb, set_reasons
from pipelines.resumable_parquet import PrepareOptions, parts_progress, run_stage, to_arrow
from simplear.config import StrictModel
from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer, pil_to_tensor
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.manifest import commit_json
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
    prepare: PrepareOptions = PrepareOptions()

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


def pixels_column(name: str) -> str:
    return f"_pixels@{name}"


def prepare_crops(table: pa.Table, *, run: str, resolutions: list[Resolution]) -> pa.Table:
    """In the reader tasks, on CPU: fetch each row's image by reference, decode it and centre-crop it to every
    resolution it reaches (raw RGB), so the encoder's actor only runs the model. Rows that reach none,
    or cannot be read, get their reason here."""
    images, reasons, errors = open_images(table, run)
    for res in resolutions:
        crops = [center_crop_arr(im, res.size) if im is not None and min(im.size) >= res.threshold else None for im in images]
        table = table.append_column(pixels_column(res.name), raw_rgb(crops))
    for i, im in enumerate(images):
        if im is not None and all(min(im.size) < r.threshold for r in resolutions):
            reasons[i] = "below_every_resolution"
    return set_reasons(table, reasons, errors)


class Encoder:
    """The actor of the pool: one visual tokenizer, called on prepared rows (an Arrow table, see `prepare_crops`)."""

    def __init__(self, cfg: TokenizeConfig, cpus: float, writer=None):
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.cfg = cfg
        self.tokenizer = load_visual_tokenizer(cfg.tokenizer)
        self.writer = writer  # writes the output's parts (in the pipeline); None returns the table (tests)

    def encode(self, crops: list[bytes], size: int) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray] = []
        bs = self.cfg.batch_size
        for i in range(0, len(crops), bs):
            x_BCHW = torch.stack([pil_to_tensor(from_raw_rgb(c, size, size)) for c in crops[i : i + bs]])
            codes_BHW = self.tokenizer.encode(x_BCHW).cpu()
            assert int(codes_BHW.min()) >= 0 and int(codes_BHW.max()) < self.tokenizer.codebook_size
            out += [c.reshape(-1).numpy().astype(np.int32) for c in codes_BHW]
        return out

    def __call__(self, table: pa.Table):
        n = table.num_rows
        reasons, errors = table["reason"].to_pylist(), table["error_message"].to_pylist()
        codes_by_res: dict[str, list] = {}
        for res in self.cfg.resolutions:
            crops = table[pixels_column(res.name)]
            idx = [i for i in range(n) if crops[i].is_valid]
            column: list = [None] * n
            try:
                for i, codes in zip(idx, self.encode([crops[i].as_py() for i in idx], res.size)):
                    column[i] = codes
            except Exception:  # noqa: BLE001 - one image at a time to find the bad ones
                for i in idx:
                    try:
                        column[i] = self.encode([crops[i].as_py()], res.size)[0]
                    except Exception as e1:  # noqa: BLE001
                        reasons[i], errors[i] = "encode_error", f"{type(e1).__name__}: {e1}"[:500]
            codes_by_res[res.name] = column
        table = set_reasons(table.drop_columns([pixels_column(r.name) for r in self.cfg.resolutions]), reasons, errors)
        table = table.append_column("tokenizer", pa.array([self.tokenizer.name] * n, pa.string()))
        # typed list columns: a pandas column mixing arrays and None would be pickled by Ray Data
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


@register_stage("tokenize", TokenizeConfig, version=2, operational=("batch_size", "rows_per_part", "prepare.cpus", "prepare.tasks"),
                progress=parts_progress, object_store=True)
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
    check_pixel_files(ctx.store, pixel_files(ctx), ctx.name)
    folders = [r.name for r in cfg.resolutions] + ["rejected"]
    result = run_stage(
        ctx,
        folders=folders,
        split=Split(cfg.resolutions),
        process=Encoder,
        process_kwargs={"cfg": cfg, "cpus": ctx.resources.cpus},
        batch_size=cfg.rows_per_part,
        rows_per_block=cfg.batch_size,
        prepare=prepare_crops,
        prepare_kwargs={"run": ctx.store.uri, "resolutions": cfg.resolutions},
        prepare_options=cfg.prepare,
        whole_sources_on_cpu=True,
    )
    commit_json(ctx.store, ctx.key("tokenizer.json"), info)
    result.metrics.update(tokenizer=info["name"], codebook_size=info["codebook_size"])
    return result


__all__ = ["TokenizeConfig", "Resolution", "center_crop_arr", "SCHEMA"]
