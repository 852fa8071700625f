"""Torch sampling engine: batched AR generation of visual codes with a KV cache and classifier-free guidance.

Each request's conditional row and, when cfg_scale != 1, its unconditional row (the negative prompt) run
through the model together, one token per step, on a preallocated static KV cache (`simplear.sampling.rows`):
the step reads nothing back to the host, attends only to the slots in use with grouped-query attention kept grouped,
and on CUDA it is a replayed CUDA graph (one per length bucket). The token is drawn from the
CFG-combined distribution over the visual ids with the request's own uniforms (`simplear.sampling.draw`, shared
with vLLM's logits processor and SJD): one seed names one image whatever else is in the batch.
"""

from __future__ import annotations

import torch

from simplear.sampling.draw import DrawSettings, SamplingParams, request_uniforms, resolve_seed
from simplear.sampling.rows import CudaGraphs, KVRows, VisualHead, drawing

__all__ = ["SamplingParams", "TorchSampler", "resolve_seed"]


class RepetitionPenalty:
    """Hugging Face's `RepetitionPenaltyLogitsProcessor` on the B conditional rows' logits over every id (the first B
    rows of a step's logits; the unconditional ones untouched, as the reference's CFG processor runs after it on the
    conditional scores only): each id already in the row, prompt included, has its logit divided by the penalty
    (multiplied where negative)."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], V: int, device):
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        self.active = any(p.repetition_penalty != 1.0 for p in params)
        self.seen = torch.zeros((len(prompts), V), dtype=torch.bool, device=device)
        for i, ids in enumerate(prompts):
            self.seen[i, torch.tensor(ids, dtype=torch.long, device=device)] = True

    def __call__(self, logits_RV: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits_RV
        B = len(self.seen)
        c = logits_RV[:B]
        penalised = torch.where(c < 0, c * self.penalty, c / self.penalty)
        return torch.cat([torch.where(self.seen, penalised, c), logits_RV[B:]])

    def saw(self, tokens_B: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens_B[:, None], True)


class TorchSampler:
    """Generates visual codes (and images) from a causal LM over a `Vocabulary`.

    `device` None keeps the model where it is. `use_kv_cache=False` recomputes the whole prefix
    every step, and `batch_cfg=False` runs conditional and unconditional rows as two forwards:
    both exist for the benchmark, the results are the same. `capture` (default: on CUDA) replays
    the one-token step from recorded graphs, one per length bucket; it needs the KV cache, and CUDA unless a `recorder`
    is given (by default a new `CudaGraphs` per stream and call; the tests give an eager stand-in with its protocol,
    which rehearses the bucketed step on CPU).
    """

    def __init__(self, model, vocab, visual_tokenizer=None, device=None, use_kv_cache: bool = True,
                 batch_cfg: bool = True, max_text_tokens: int | None = None, capture: bool | None = None,
                 recorder=None):
        if device is not None:
            model.to(device)
        self.model = model
        self.vocab = vocab
        self.visual_tokenizer = visual_tokenizer
        self.device = next(model.parameters()).device
        self.use_kv_cache = use_kv_cache
        self.batch_cfg = batch_cfg
        self.max_text_tokens = max_text_tokens
        self.recorder = recorder
        on_cuda = self.device.type == "cuda"
        self.capture = ((on_cuda or recorder is not None) and use_kv_cache) if capture is None else capture
        if self.capture and (not (on_cuda or recorder is not None) or not use_kv_cache):
            raise ValueError(f"capture (CUDA graphs of the cached step) needs a CUDA device and the KV cache, "
                             f"got {self.device} with use_kv_cache={use_kv_cache}")
        if model.config._attn_implementation != "sdpa":
            raise ValueError(f"the torch engine builds SDPA attention masks: load the model with attn_implementation='sdpa' "
                             f"(got {model.config._attn_implementation!r})")
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            raise ValueError(f"the torch engine's KV cache has full-attention layers only, got {model.config.layer_types}")
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab.size:
            raise ValueError(f"model has {rows} output rows, vocabulary needs {vocab.size}")
        if visual_tokenizer is not None and visual_tokenizer.codebook_size != vocab.codebook_size:
            raise ValueError(f"visual tokenizer has {visual_tokenizer.codebook_size} codes, vocabulary {vocab.codebook_size}")

    def _params(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"{n} prompts but {len(params)} SamplingParams")
        return params

    def generate_codes(self, prompts: list[str], grid: tuple[int, int], params=None, return_logprobs: bool = False):
        """Codes (B, h, w) on CPU; with `return_logprobs`, also (B, h*w) float32 log-probs of the
        sampled codes under the CFG-combined, temperature-scaled distribution over the visual ids
        (before top-k/top-p truncation: what a training forward can recompute). Requests in the reference mode
        are drawn apart from the others (over every id); their log-probs are those of the ids drawn."""
        if isinstance(prompts, str):
            prompts = [prompts]
        h, w = grid
        B, N = len(prompts), h * w
        params = self._params(params, B)
        if B == 0:
            codes = torch.empty((0, h, w), dtype=torch.long)
            return (codes, torch.empty((0, N))) if return_logprobs else codes
        # not inference_mode: callers (GRPO) use the log-probs next to autograd tensors
        with drawing(self.model), torch.no_grad():
            codes = torch.empty((B, N), dtype=torch.long, device=self.device)
            logps = torch.empty((B, N), dtype=torch.float32, device=self.device)
            for reference in (False, True):
                group = [i for i, p in enumerate(params) if p.reference_mode == reference]
                if group:
                    at = torch.tensor(group, device=self.device)
                    got = self._generate([prompts[i] for i in group], N, [params[i] for i in group], reference)
                    codes[at], logps[at] = got
        codes = codes.view(B, h, w).cpu()
        return (codes, logps.float().cpu()) if return_logprobs else codes

    def prompt_rows(self, prompts: list[str], params: list[SamplingParams], d: DrawSettings) -> list[list[int]]:
        """Token ids of every request's conditional row, then of the unconditional rows of the guided ones (`d.guided`)."""
        cond = [self.vocab.prompt_ids(q.conditional(p), self.max_text_tokens) for p, q in zip(prompts, params)]
        return cond + [self.vocab.prompt_ids(params[i].negative_prompt, self.max_text_tokens) for i in d.guided]

    def _generate(self, prompts, N, params, reference: bool = False):
        """`reference`: the draws are over every id (the reference mode): a text id drawn stays in the rows, as in
        the reference's Hugging Face generate, and decodes as code 0, as its `clamp` does."""
        vocab, dev, B = self.vocab, self.device, len(prompts)
        uniforms = torch.stack([request_uniforms(resolve_seed(p), N) for p in params]).to(dev)
        K, vo = vocab.codebook_size, vocab.visual_offset
        d = DrawSettings.of(params, vocab.size if reference else K, dev)
        rows = self.prompt_rows(prompts, params, d)
        head = VisualHead(self.model, vocab, every_id=reference)
        penalty = RepetitionPenalty(params, rows[:B], vocab.size, dev) if reference else None
        mk = lambda r: KVRows(self.model, head, r, vocab.pad_id, capacity=N, use_cache=self.use_kv_cache)  # noqa: E731
        # one stream: one forward of all B + U rows; two (batch_cfg=False): two full forwards, LM head included
        streams = [mk(rows)] if (self.batch_cfg or len(rows) == B) else [mk(rows[:B]), mk(rows[B:])]
        split = [len(s.ids) for s in streams]
        follow = torch.tensor(list(range(B)) + d.guided, device=dev)  # row r feeds the token of request follow[r]
        codes = torch.empty((B, N), dtype=torch.long, device=dev)
        logps = torch.empty((B, N), dtype=torch.float32, device=dev)
        logits = torch.cat([s.prefill() for s in streams])  # (B + U, K)
        if self.capture:
            for s in streams:
                s.capture(self.recorder or CudaGraphs(dev))
        for t in range(N):
            if penalty is not None:
                logits = penalty(logits)
            final = d.final_logprobs(logits)
            tok = d.draw(final, uniforms[:, t])
            codes[:, t] = (tok - vo).clamp(0, K - 1) if reference else tok
            logps[:, t] = final.gather(-1, tok[:, None]).squeeze(-1)
            if penalty is not None:
                penalty.saw(tok)
            if t + 1 < N:
                feed = (tok[follow] + (0 if reference else vo)).split(split)
                logits = torch.cat([s.decode(x) for s, x in zip(streams, feed)])
        return codes, logps

    def generate_images(self, prompts: list[str], size=None, params=None, grid: tuple[int, int] | None = None):
        """PIL images; `size` in pixels (int for square, or (H, W)), or `grid` in codes."""
        from simplear.visual_tokenizers import tensor_to_pil

        if self.visual_tokenizer is None:
            raise ValueError("TorchSampler needs a visual_tokenizer to make images")
        if isinstance(prompts, str):
            prompts = [prompts]
        d = self.visual_tokenizer.downsample
        if grid is None:
            if size is None:
                raise ValueError("give size (pixels) or grid (codes)")
            H, W = (size, size) if isinstance(size, int) else size
            if H % d or W % d:
                raise ValueError(f"size {H}x{W} is not a multiple of the visual tokenizer's downsample {d}")
            grid = (H // d, W // d)
        codes = self.generate_codes(prompts, grid, params)
        images = self.visual_tokenizer.decode(codes)
        return [tensor_to_pil(img) for img in images]
