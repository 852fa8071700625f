"""The text-to-image task of pretrain and SFT: sequences, loss, sample grid, data discovery and the stage body."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from simplear.config import ConfigError, StrictModel
from simplear.sampling.spec import SamplingSpec, recorded_sampling
from simplear.train.config import FINAL, LOSS_CURVE, METRICS, SAMPLES, TrainConfig
from simplear.train.figures import plot_loss_curve
from simplear.train.fit import run_training
from simplear.train.metrics import summarize
from simplear.train.task import Bundle, TrainTask
from simplear.train_data import DataFile, Position
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import MAX_TEXT_TOKENS

log = logging.getLogger("simplear.train")


class DataSpec(StrictModel):
    stage: str = "tokenize"  # the needed stage whose tokenized Parquet is read
    resolution: int | None = None  # its sub-folder for this resolution (`<stage>/<resolution>/part-*.parquet`); None: all its Parquet
    caption: Literal["original", "long", "short"] = "original"  # long/short fall back to the original when empty


class SequenceSpec(StrictModel):
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="probability that a caption is dropped (teaches the unconditional model)")
    image_loss_only: bool = False  # default: the loss covers every token, like the reference code
    max_text_tokens: int | None = Field(MAX_TEXT_TOKENS, ge=1, description="caption tokens kept (recaption writes up to 256)")


class SampleSpec(StrictModel):
    """The end-of-stage grid: `per_prompt` samples of each fixed prompt."""

    prompts: list[str] = [
        "a red circle on a blue background",
        "a yellow square on a black background",
        "a white triangle on a green background",
        "a purple diamond on an orange background",
    ]
    per_prompt: int = Field(4, ge=1)
    sampling: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="keys left out: the stage's checkpoint defaults (`defaults`)")
    seed: int = 0
    cell_pixels: int = Field(96, ge=16, description="each sample is shown at least this big (nearest-neighbour)")


CAPTION_COLUMNS = {"original": "caption", "long": "caption_long", "short": "caption_short"}


class T2ITask(TrainTask):
    """Next-token training on `<|t2i|>` caption `<|soi|>` visual tokens: pretrain and SFT."""

    def __init__(self, *, sequence: SequenceSpec, caption: str, samples: SampleSpec | None, grid: tuple[int, int],
                 seed: int, checkpoint: str | None = None, model_init: str = "tiny", text_tokenizer: str | None = None,
                 model_overrides: dict | None = None, visual_tokenizer: VisualTokenizerConfig | None = None,
                 defaults: SamplingSpec | None = None):
        self.sequence, self.caption, self.samples, self.grid, self.seed = sequence, caption, samples, grid, seed
        self.defaults = defaults or SamplingSpec()
        self.checkpoint, self.model_init, self.text_tokenizer = checkpoint, model_init, text_tokenizer
        self.model_overrides, self.visual_tokenizer = model_overrides or {}, visual_tokenizer

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([CAPTION_COLUMNS[self.caption], "caption", "codes"]))

    def build(self, device, resume_dir: Path | None) -> Bundle:
        import torch

        from simplear.model import build_model, load_checkpoint
        from simplear.vocab import Vocabulary

        from simplear.storage.staging import local_folder

        source = resume_dir or (local_folder(self.checkpoint) if self.checkpoint else None)
        if source is not None:  # a release as published has no simplear.json: it is read with its visual tokenizer
            ck = load_checkpoint(source, device="cpu", dtype=torch.float32, visual_tokenizer=self.visual_tokenizer)
            return Bundle(ck.model, ck.vocab, ck.visual_tokenizer_config, self.defaults.over(ck.sampling))
        vocab = Vocabulary(self.text_tokenizer or self.model_init, codebook_size=self.visual_tokenizer.codebook_size)
        model = build_model(self.model_init, vocab, dtype=torch.float32, **self.model_overrides)
        return Bundle(model, vocab, self.visual_tokenizer, self.defaults.complete())

    def collate(self, rows: dict[str, np.ndarray], position: Position, rank: int, bundle: Bundle) -> dict:
        import torch

        chosen = rows[CAPTION_COLUMNS[self.caption]]
        captions = [c if isinstance(c, str) and c.strip() else o for c, o in zip(chosen, rows["caption"])]
        codes = [np.asarray(c, dtype=np.int64) for c in rows["codes"]]
        # CFG dropout draws depend on the data position only, so a resumed run drops the same captions
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{position.epoch}/{position.batch}/{rank}".encode()))
        return bundle.vocab.build_batch(captions, codes, cfg_dropout=self.sequence.cfg_dropout,
                                       image_loss_only=self.sequence.image_loss_only, generator=g,
                                       max_text_tokens=self.sequence.max_text_tokens)

    def loss(self, model, batch: dict, bundle: Bundle):
        import torch

        from simplear.losses import causal_lm_cross_entropy

        labels = batch["labels"]
        ce_BL = causal_lm_cross_entropy(model, batch)  # never the whole (B, L, 215.7k) logits in fp32
        target_BL = labels[:, 1:]
        trained = target_BL != -100
        image = trained & (target_BL >= bundle.vocab.visual_offset)
        text = trained & ~image
        n = trained.sum()
        loss = (ce_BL * trained).sum() / n.clamp(min=1)
        ce = ce_BL.detach()
        stats = {
            "loss_sum": loss.detach() * n, "loss_count": n,
            "image_loss_sum": (ce * image).sum(), "image_loss_count": image.sum(),
            "text_loss_sum": (ce * text).sum(), "text_loss_count": text.sum(),
            "tokens": batch["attention_mask"].sum(),
            "sequences": torch.tensor(labels.shape[0]),
        }
        return loss, stats

    def finish(self, bundle: Bundle, model, out_dir: Path, device, autocast) -> None:
        if self.samples is None:
            return
        grid_img = sample_grid(model, bundle.vocab, bundle.visual_tokenizer_config, self.samples, bundle.sampling,
                               self.grid, device, autocast)
        from simplear.workflow.manifest import atomic_path

        with atomic_path(out_dir / SAMPLES) as tmp:
            grid_img.save(tmp, format="PNG")


def sample_grid(model, vocab, vt_config, spec: SampleSpec, defaults: SamplingSpec, grid: tuple[int, int], device,
                autocast=contextlib.nullcontext):
    """A PNG-ready image: one row per prompt (its text above), `per_prompt` samples each, drawn with the grid's
    settings over `defaults` (the checkpoint's)."""
    from PIL import Image, ImageDraw

    from simplear.sampler import TorchSampler
    from simplear.visual_tokenizers import load_visual_tokenizer

    sampler = TorchSampler(model, vocab, load_visual_tokenizer(vt_config), device=device)
    prompts = [p for p in spec.prompts for _ in range(spec.per_prompt)]
    sampling = spec.sampling.over(defaults)
    params = [sampling.params(spec.seed + i) for i in range(len(prompts))]
    with autocast():
        images = sampler.generate_images(prompts, grid=grid, params=params)
    h, w = images[0].height, images[0].width
    zoom = max(1, math.ceil(spec.cell_pixels / max(h, w)))
    cw, ch, label, pad = w * zoom, h * zoom, 14, 4
    sheet = Image.new("RGB", (pad + spec.per_prompt * (cw + pad), len(spec.prompts) * (label + ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, prompt in enumerate(spec.prompts):
        y = pad + r * (label + ch + pad)
        draw.text((pad, y), prompt, fill="black")
        for c in range(spec.per_prompt):
            img = images[r * spec.per_prompt + c].resize((cw, ch), Image.NEAREST)
            sheet.paste(img, (pad + c * (cw + pad), y + label))
    return sheet


def has_final_checkpoint(manifest: dict) -> bool:
    """Whether a stage's manifest records a final/ checkpoint (a training stage's output)."""
    return any(o["path"].startswith(f"{FINAL}/") for o in manifest["outputs"])


@dataclass(frozen=True)
class InitCheckpoint:
    location: str  # a folder, or on object storage `<run dir URI>/<stage>/final` (workers fetch it with `local_folder`)
    visual_tokenizer: VisualTokenizerConfig  # what it decodes with
    sampling: SamplingSpec  # the sampling defaults it records, complete


def resolve_init(ctx, init: str, where: str, visual_tokenizer: VisualTokenizerConfig | None = None) -> InitCheckpoint:
    """The checkpoint a stage starts from (SFT from pretrain, GRPO from SFT); a released checkpoint as published is
    taken with `visual_tokenizer` (checked against it). A wrong or missing one is a ConfigError naming the key."""
    from simplear.model import checkpoint_meta
    from simplear.storage.staging import local_folder

    if init in ctx.needs:
        manifest = ctx.input_manifest(init)
        if not has_final_checkpoint(manifest):
            raise ConfigError(f"{where}.init: stage {init!r} recorded no {FINAL}/ checkpoint (is it a training stage?)")
        location = ctx.store.child(f"{init}/{FINAL}")
    else:
        location = str(ctx.config_path(init))
        if not Path(location).exists():
            raise ConfigError(f"{where}.init: {init!r} is neither a stage this one needs ({', '.join(ctx.needs)}) "
                              f"nor an existing checkpoint folder ({location} not found)")
    try:
        meta = checkpoint_meta(local_folder(location), visual_tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}.init: {e} (expected a folder written by a pretrain/sft stage, or a released "
                          f"checkpoint with `{where}.visual_tokenizer`)") from None
    return InitCheckpoint(location, VisualTokenizerConfig.model_validate(meta["visual_tokenizer"]), recorded_sampling(meta))


def train_progress(location: str) -> str | None:
    """The last logged step (and loss) of a running or interrupted training stage, from the end of its
    metrics.jsonl (a ranged read: the file grows with every step)."""
    from pyarrow import fs as pafs

    from simplear.storage import open_parent

    store, stage = open_parent(location)
    fs, root = store.filesystem()
    try:
        with (fs or pafs.LocalFileSystem()).open_input_file(f"{root}/{stage}/{METRICS}") as f:
            f.seek(max(0, f.size() - 8192))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:  # not there (yet)
        return None
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None
    loss = row.get("loss")
    return f"step {row.get('step')}" + (f", loss {loss:.4g}" if isinstance(loss, (int, float)) else "")


class T2IStageConfig(StrictModel):
    """What pretrain and SFT share; each stage adds how its model starts (`init`)."""

    data: DataSpec
    sequence: SequenceSpec = SequenceSpec()
    train: TrainConfig
    samples: SampleSpec | None = SampleSpec()
    defaults: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="the sampling settings its checkpoints record, which generate, serve, eval "
                                               "and GRPO use unless told otherwise; keys left out: the init checkpoint's "
                                               "(from scratch: the built-in ones)")


@dataclass
class TokenizedData:
    files: list[DataFile]  # with their row counts, from the data stage's manifest
    grid: tuple[int, int]  # codes per column and row of the most common image size
    downsample: int  # pixels per code side, from the first row
    rows: int
    visual_tokenizer: dict | None  # what the data stage recorded, if anything


def tokenized_data(ctx, spec: DataSpec, where: str) -> TokenizedData:
    """The data stage's Parquet for this resolution, checked before any training starts."""
    if spec.stage not in ctx.needs:
        raise ConfigError(f"{where}.data.stage: {spec.stage!r} is not among the stage's needs {ctx.needs}")
    # the files the data stage recorded, with the row counts its manifest holds (no file is scanned)
    rows_of = {o["path"]: int(o.get("rows") or 0) for o in ctx.input_manifest(spec.stage)["outputs"]
               if o["path"].endswith(".parquet")}
    rels = list(rows_of)
    if spec.resolution is not None:
        found = sorted({r.split("/")[0] for r in rels if "/" in r})
        rels = [r for r in rels if r.split("/")[0] == str(spec.resolution)]
        if not rels:
            raise ConfigError(f"{where}.data.resolution: stage {spec.stage!r} has no Parquet under "
                              f"{spec.stage}/{spec.resolution} (resolutions it has: {', '.join(found) or 'none'})")
    if not rels:
        raise ConfigError(f"{where}.data.stage: stage {spec.stage!r} recorded no Parquet outputs")
    listed = [DataFile(str(ctx.input_path(spec.stage, r)), rows_of[r], ctx.store.uri) for r in rels]
    schema = listed[0].parquet().schema_arrow
    needed = {"codes", "caption", CAPTION_COLUMNS[spec.caption], "height", "width"}
    missing = sorted(needed - set(schema.names))
    if missing:
        raise ConfigError(f"{where}.data: {listed[0].path} lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    # sizes from one row: every row of a resolution's folder has that resolution's size
    rows = sum(f.rows for f in listed)
    if not rows:
        raise ConfigError(f"{where}.data: the Parquet of stage {spec.stage!r} has no rows")
    first_file = next(f for f in listed if f.rows)
    first = first_file.parquet().read_row_group(0, columns=["codes", "height", "width"]).slice(0, 1).to_pylist()[0]
    h, w = first["height"], first["width"]
    if h * w % len(first["codes"]):
        raise ConfigError(f"{where}.data: {first_file.path}: {len(first['codes'])} codes for a {h}x{w} image")
    d = int(round(math.sqrt(h * w / len(first["codes"]))))
    return TokenizedData(files=listed, grid=(h // d, w // d), downsample=d, rows=rows, visual_tokenizer=_data_tokenizer(ctx, spec.stage))


def _data_tokenizer(ctx, stage: str) -> dict | None:
    """The visual tokenizer config the data stage encoded with: its `tokenizer.json`, else its config's `tokenizer`."""
    info = ctx.store.read_json(f"{stage}/tokenizer.json") or {}
    if isinstance(info.get("config"), dict):
        return info["config"]
    config = ctx.input_manifest(stage).get("config", {})
    for key in ("tokenizer", "visual_tokenizer"):
        if isinstance(config.get(key), dict) and "kind" in config[key]:
            return config[key]
    return None


def check_codebook(data: TokenizedData, vt: VisualTokenizerConfig, where: str) -> None:
    """Codes must fit the codebook the model is built for, and the data's tokenizer must be the model's."""
    import pyarrow.compute as pc

    if data.visual_tokenizer is not None:
        theirs = VisualTokenizerConfig.model_validate(data.visual_tokenizer)
        keys = ("kind", "levels", "downsample", "codebook_size", "path")
        diff = [k for k in keys if getattr(theirs, k) != getattr(vt, k) and not (k == "levels" and vt.kind != "pixel-fsq")]
        if diff:
            raise ConfigError(f"{where}: the data was tokenized with {theirs.model_dump(include=set(keys))} but the model's "
                              f"visual tokenizer is {vt.model_dump(include=set(keys))} (differs in {', '.join(diff)})")
    if data.downsample != vt.downsample:
        raise ConfigError(f"{where}: the data has one code per {data.downsample}x{data.downsample} pixels, "
                          f"the model's visual tokenizer one per {vt.downsample}x{vt.downsample}")
    top = pc.max(pc.list_flatten(data.files[0].parquet().read(columns=["codes"])["codes"])).as_py()
    if top is not None and top >= vt.codebook_size:
        raise ConfigError(f"{where}: code {top} in {data.files[0].path} is outside the model's codebook of {vt.codebook_size}")


def run_t2i_stage(ctx, task_kwargs: dict, vt: VisualTokenizerConfig | None, data: TokenizedData):
    """Shared body of the pretrain and SFT stages, after each resolved its init: train, export, figures."""
    from simplear.workflow.context import StageResult

    cfg: T2IStageConfig = ctx.config
    where = f"stages.{ctx.name}.config"
    if vt is not None:
        check_codebook(data, vt, where)
    task = T2ITask(sequence=cfg.sequence, caption=cfg.data.caption, samples=cfg.samples, grid=data.grid,
                   seed=cfg.train.seed, visual_tokenizer=vt, defaults=cfg.defaults, **task_kwargs)
    run = run_training(ctx, task, cfg.train, files=data.files, columns=task.columns)
    with ctx.output(LOSS_CURVE) as tmp:
        tmp.write_bytes(plot_loss_curve(run.rows, title=f"{ctx.name}: {data.rows} sequences, grid {data.grid[0]}x{data.grid[1]}"))
    metrics = {**run.metrics, "rows": data.rows, "grid": list(data.grid), **summarize(run.rows)}
    ctx.log.debug("%s: %s", ctx.name, metrics)  # the engine's `done` line gives the key figures
    outputs = [FINAL, METRICS, LOSS_CURVE] + ([SAMPLES] if ctx.has_output(SAMPLES) else [])
    return StageResult(metrics=metrics, outputs=outputs, artifacts=[SAMPLES, LOSS_CURVE, f"{FINAL}/"])
