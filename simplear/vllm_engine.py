"""vLLM sampling engine for the AR model, with classifier-free guidance inside vLLM.

vLLM has no CFG. Here every image with cfg_scale != 1 is two vLLM requests, a conditional one
(`<|t2i|>` caption `<|soi|>`) and an unconditional one (the negative prompt, empty by default),
tagged as a pair through `SamplingParams.extra_args`. `CFGLogitsProcessor`, a batch-level V1
logits processor, finds both rows of each pair in the batch at every step, combines them over the
visual ids exactly as the torch engine does (log-softmax of each, `u + s*(c - u)`, log-softmax),
writes the combined row into *both* rows and -inf on every non-visual id. Both requests carry the
same seed, so with identical rows they draw the same token: the unconditional sequence is fed the
image's tokens, as in the torch engine's batched CFG. Requests without CFG get the visual-only
restriction alone. vLLM's `allowed_token_ids` is not used: it masks to -inf *before* custom
processors, and `c - u` on two -inf entries is NaN.

Lock-step is guaranteed by admission, not hoped for: `generate_codes` hands vLLM at most
`max_num_seqs` rows at once, with a prompt-token total within the step's token budget and a KV
need within the cache, so vLLM admits every row in the first step and never preempts one; pairs
are never split across such chunks. Each pair's two outputs must then be identical token for
token, which is checked on every call (a pair that went out of step would diverge).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from simplear.config import StrictModel
from simplear.sampler import SamplingParams, TorchSampler
from simplear.vocab import MAX_TEXT_TOKENS

EXTRA_KEY = "simplear"  # SamplingParams.extra_args[EXTRA_KEY] = {"visual": [lo, hi], "pair": id, "role": ..., "scale": s}


class VLLMOptions(StrictModel):
    """How the vLLM engine is built; the defaults suit a CPU machine and the demo's small images."""

    max_num_seqs: int = Field(32, ge=2)  # rows per engine step (a CFG image is two rows)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # "auto": the checkpoint's (vLLM's own "auto" is bf16 on CPU)
    kv_cache_gib: float | None = Field(None, gt=0)  # None: vLLM's default (CPU: VLLM_CPU_KVCACHE_SPACE, else 4 GiB)
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)  # on CPU: the fraction of RAM vLLM may reserve
    enforce_eager: bool | None = None  # None: eager on CPU (no compile wait), graphs on GPU
    in_process: bool = True  # run vLLM's engine core in this process (no spawn; suits a Ray actor)
    seed: int = 0


# -- the logits processor -------------------------------------------------------------------------


@dataclass
class _Row:
    lo: int
    hi: int
    pair: str | None
    role: str | None  # "cond" | "uncond" | None
    scale: float
    output_ids: list[int] = field(default_factory=list)  # vLLM's live list of the request's output tokens


def _row_from_params(params, _prompt_ids, output_ids) -> _Row | None:
    spec = (params.extra_args or {}).get(EXTRA_KEY)
    if spec is None:
        return None
    lo, hi = spec["visual"]
    return _Row(int(lo), int(hi), spec.get("pair"), spec.get("role"), float(spec.get("scale", 1.0)), output_ids)


def _validate_spec(spec) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be a dict, got {type(spec).__name__}")
    visual = spec.get("visual")
    if not (isinstance(visual, (list, tuple)) and len(visual) == 2 and 0 <= visual[0] < visual[1]):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['visual'] must be [lo, hi) with 0 <= lo < hi, got {visual!r}")
    if spec.get("pair") is not None and spec.get("role") not in ("cond", "uncond"):
        raise ValueError(f"extra_args[{EXTRA_KEY!r}]['role'] must be 'cond' or 'uncond' for a pair, got {spec.get('role')!r}")


@dataclass
class _Group:
    """Rows that share a visual range: tensors of batch indices built once per batch change."""

    lo: int
    hi: int
    rows: torch.Tensor
    cond_pos: torch.Tensor  # positions within `rows`
    uncond_pos: torch.Tensor
    scale: torch.Tensor  # (pairs, 1)
    pairs: list[tuple[int, int]]  # batch indices (cond, uncond), for the lock-step check


class CFGLogitsProcessor:
    """See the module docstring. Not argmax-invariant: it changes greedy picks (CFG, visual-only)."""

    # The vLLM base class is attached lazily (see `logits_processor_class`) so that importing this
    # module, e.g. for the serve stage's config, does not import vLLM.

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False):
        self.device = device if device is not None else torch.device("cpu")
        self.rows: dict[int, _Row] = {}
        self._groups: list[_Group] | None = None
        self.out_of_step = 0  # steps where a pair's rows were missing or at different lengths

    @classmethod
    def validate_params(cls, params) -> None:
        spec = (params.extra_args or {}).get(EXTRA_KEY)
        if spec is not None:
            _validate_spec(spec)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        if process_dict_updates(self.rows, batch_update, _row_from_params):
            self._groups = None

    def _build_groups(self) -> list[_Group]:
        by_range: dict[tuple[int, int], list[int]] = {}
        for idx, row in self.rows.items():
            by_range.setdefault((row.lo, row.hi), []).append(idx)
        groups = []
        for (lo, hi), idxs in by_range.items():
            idxs.sort()
            pos = {idx: p for p, idx in enumerate(idxs)}
            members: dict[str, dict[str, int]] = {}
            for idx in idxs:
                row = self.rows[idx]
                if row.pair is not None:
                    members.setdefault(row.pair, {})[row.role] = idx
            pairs = [(m["cond"], m["uncond"]) for m in members.values() if "cond" in m and "uncond" in m]
            self.out_of_step += sum(1 for m in members.values() if len(m) != 2)  # a partner is not in this batch
            dev = self.device
            groups.append(_Group(
                lo, hi,
                rows=torch.tensor(idxs, dtype=torch.long, device=dev),
                cond_pos=torch.tensor([pos[c] for c, _ in pairs], dtype=torch.long, device=dev),
                uncond_pos=torch.tensor([pos[u] for _, u in pairs], dtype=torch.long, device=dev),
                scale=torch.tensor([[self.rows[c].scale] for c, _ in pairs], dtype=torch.float32, device=dev).reshape(-1, 1),
                pairs=pairs,
            ))
        return groups

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self._groups is None:
            self._groups = self._build_groups()
        for g in self._groups:
            for c, u in g.pairs:
                if len(self.rows[c].output_ids) != len(self.rows[u].output_ids):
                    self.out_of_step += 1
            logp = F.log_softmax(logits[g.rows, g.lo:g.hi].float(), -1)
            if g.pairs:
                c, u = logp[g.cond_pos], logp[g.uncond_pos]
                comb = F.log_softmax(u + g.scale * (c - u), -1)
                logp[g.cond_pos] = comb
                logp[g.uncond_pos] = comb
            logits[g.rows] = float("-inf")
            logits[g.rows, g.lo:g.hi] = logp.to(logits.dtype)
        return logits


_PROCESSOR_CLASS = None


def logits_processor_class():
    """`CFGLogitsProcessor` as a subclass of vLLM's V1 `LogitsProcessor` (what `LLM(logits_processors=...)` wants)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        from vllm.v1.sample.logits_processor import LogitsProcessor

        _PROCESSOR_CLASS = type("SimpleARCFGLogitsProcessor", (CFGLogitsProcessor, LogitsProcessor), {"__module__": __name__})
    return _PROCESSOR_CLASS


def __getattr__(name):  # vLLM may load the processor by its qualified name `simplear.vllm_engine:SimpleARCFGLogitsProcessor`
    if name == "SimpleARCFGLogitsProcessor":
        return logits_processor_class()
    raise AttributeError(name)


def _saved_config(checkpoint: Path) -> dict:
    import json

    return json.loads((checkpoint / "config.json").read_text())


def _saved_dtype(checkpoint: Path) -> str:
    config = _saved_config(checkpoint)
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


# -- the engine -----------------------------------------------------------------------------------


@dataclass
class _Job:
    """One image: its conditional request and, with CFG, its unconditional partner."""

    index: int
    rows: list[tuple[list[int], object]]  # (prompt ids, vllm.SamplingParams)


class VLLMSampler:
    """Same interface as `TorchSampler` (`generate_codes`, `generate_images`), backed by vLLM."""

    def __init__(self, checkpoint, visual_tokenizer=None, options: VLLMOptions | dict | None = None,
                 max_text_tokens: int = MAX_TEXT_TOKENS, max_image_tokens: int = 1024):
        """`max_text_tokens`: caption tokens kept (longer captions are cut, as in the torch engine given the
        same limit); `max_image_tokens`: the largest grid h*w asked for. Both size vLLM's sequences."""
        from simplear.model import is_checkpoint
        from simplear.vocab import META_FILE, Vocabulary

        self.options = options if isinstance(options, VLLMOptions) else VLLMOptions.model_validate(options or {})
        if max_text_tokens < 1 or max_image_tokens < 1:
            raise ValueError(f"max_text_tokens and max_image_tokens must be >= 1, got {max_text_tokens}, {max_image_tokens}")
        self.max_text_tokens, self.max_image_tokens = max_text_tokens, max_image_tokens
        path = Path(checkpoint)
        if not is_checkpoint(path):
            raise ValueError(f"not a SimpleAR checkpoint: {path} (no valid {META_FILE})")
        self.checkpoint = path
        self.vocab = Vocabulary.from_pretrained(path)
        self.visual_tokenizer = visual_tokenizer
        if visual_tokenizer is not None and visual_tokenizer.codebook_size != self.vocab.codebook_size:
            raise ValueError(f"visual tokenizer has {visual_tokenizer.codebook_size} codes, vocabulary {self.vocab.codebook_size}")
        self.llm = self._build_llm()
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self.max_batched_tokens = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)

    def _build_llm(self):
        o = self.options
        if o.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        max_model_len = self.max_text_tokens + 2 + self.max_image_tokens
        positions = _saved_config(self.checkpoint).get("max_position_embeddings")
        if positions and max_model_len > positions:
            raise ValueError(f"max_text_tokens + 2 + max_image_tokens = {max_model_len} exceeds the model's "
                             f"{positions} positions: lower them")
        kwargs = dict(
            model=str(self.checkpoint),
            skip_tokenizer_init=True,  # prompts go in as ids; visual ids have no text to detokenize
            dtype=o.dtype if o.dtype != "auto" else _saved_dtype(self.checkpoint),
            max_model_len=max_model_len,
            max_num_seqs=o.max_num_seqs,
            # the whole admitted chunk prefills in one step (see the module docstring)
            max_num_batched_tokens=max(max_model_len, o.max_num_seqs * (self.max_text_tokens + 2)),
            enforce_eager=(not on_gpu) if o.enforce_eager is None else o.enforce_eager,
            gpu_memory_utilization=o.gpu_memory_utilization,
            logits_processors=[logits_processor_class()],
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
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            pair = uuid.uuid4().hex if p.cfg_scale != 1.0 else None

            def vparams(role):
                spec = {"visual": [lo, hi]}
                if pair is not None:
                    spec.update(pair=pair, role=role, scale=float(p.cfg_scale))
                return VParams(
                    n=1, max_tokens=N, ignore_eos=True, detokenize=False,
                    temperature=0.0 if p.is_greedy else float(p.temperature),
                    top_k=min(p.top_k or 0, hi - lo) if not p.is_greedy else 0,
                    top_p=(p.top_p or 1.0) if not p.is_greedy else 1.0,
                    seed=seed, extra_args={EXTRA_KEY: spec},
                )

            rows = [(vocab.prompt_ids(prompt, self.max_text_tokens), vparams("cond"))]
            if pair is not None:
                rows.append((vocab.prompt_ids(p.negative_prompt, self.max_text_tokens), vparams("uncond")))
            jobs.append(_Job(i, rows))
        return jobs

    def _chunks(self, jobs: list[_Job], N: int) -> list[list[_Job]]:
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
        codes = torch.empty((len(prompts), N), dtype=torch.long)
        for chunk in self._chunks(self._jobs(prompts, N, params), N):
            flat = [row for job in chunk for row in job.rows]
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in flat],
                                     [sp for _, sp in flat], use_tqdm=False)
            k = 0
            for job in chunk:
                ids = list(outs[k].outputs[0].token_ids)
                if len(job.rows) == 2 and list(outs[k + 1].outputs[0].token_ids) != ids:
                    raise RuntimeError("a CFG pair went out of step in vLLM (its two rows diverged)")
                if len(ids) != N:
                    raise RuntimeError(f"vLLM returned {len(ids)} tokens, expected {N}")
                codes[job.index] = self.vocab.ids_to_codes(torch.tensor(ids, dtype=torch.long))
                k += len(job.rows)
        return codes.view(len(prompts), h, w)
