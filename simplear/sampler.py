"""Torch sampling engine: batched AR generation of visual codes with a KV cache and classifier-free guidance.

Per step, for each request: log-probs over the visual ids only (the text ids are never scored, so
never sampled) for the conditional row c and, when cfg_scale != 1, its unconditional row u
(negative prompt, empty by default), combined as u + s*(c - u), renormalised, divided by the
temperature and renormalised again; then top-k / top-p truncation and a draw.

Determinism: a request's randomness is one stream, `request_stream(seed)`: the float64 uniforms of
a CPU `torch.Generator` seeded with its seed, taken in order (CPU draws are serial, so taking them
one at a time or n at once gives the same numbers). Token t takes uniform t and becomes the inverse
CDF of the final distribution over the visual ids at it (`sample_tokens`: in id order, or in
probability order when top-k/top-p is set). The vLLM engine's logits processor draws with the same
stream and the same functions, and speculative Jacobi decoding takes its uniforms from the same
stream, so one seed names one image whatever else is in the batch and on any device, up to float
noise in the logits. A request with cfg_scale == 1 gets no unconditional row at all: it is exactly
plain conditional sampling, and costs half.

Greedy: `greedy=True` or `temperature=0` takes the argmax of the CFG-combined log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: drawn from torch's global RNG (so torch.manual_seed makes runs repeatable)
    negative_prompt: str = ""  # the unconditional prompt of CFG; "" is the dropped caption of training
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def resolve_seed(p: SamplingParams) -> int:
    """Without a seed a request gets one from torch's global RNG, so torch.manual_seed still repeats a run."""
    return p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())


def request_stream(seed: int) -> torch.Generator:
    """The source of every uniform a request with this seed uses, in every engine (see the module docstring)."""
    return torch.Generator().manual_seed(seed)


def request_uniforms(seed: int, n: int) -> torch.Tensor:
    """The first n uniforms of the request's stream (float64, CPU): uniform t draws token t."""
    return torch.rand(n, generator=request_stream(seed), dtype=torch.float64)


class _Stream:
    """Rows that run through the model together: left-padded prompts, then one new token per step."""

    def __init__(self, prompts: list[list[int]], pad_id: int, device, use_cache: bool, config):
        L = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            self.mask[i, L - len(p):] = 1
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.use_cache = use_cache
        self.cache = None
        if use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=config)
        self.prefilled = False

    def forward(self, body, new_ids_R: torch.Tensor | None) -> torch.Tensor:
        """Hidden state of the last position of each row, (R, hidden)."""
        return self.extend(body, None if new_ids_R is None else new_ids_R[:, None])[:, -1]

    def extend(self, body, new_ids_RT: torch.Tensor | None) -> torch.Tensor:
        """Append T tokens to every row and run them (None: the prompts alone); hidden states of the
        T new positions (of every position when there is nothing new), (R, T, hidden)."""
        T = self.ids.shape[1]
        if new_ids_RT is not None:
            T = new_ids_RT.shape[1]
            self.ids = torch.cat([self.ids, new_ids_RT], 1)
            self.mask = torch.cat([self.mask, torch.ones_like(new_ids_RT)], 1)
            self.pos = torch.cat([self.pos, self.pos[:, -1:] + torch.arange(1, T + 1, device=self.pos.device)], 1)
        if self.use_cache and self.prefilled:
            ids, pos = self.ids[:, -T:], self.pos[:, -T:]
        else:
            ids, pos = self.ids, self.pos
        out = body(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                   past_key_values=self.cache, use_cache=self.use_cache)
        self.prefilled = True
        return out.last_hidden_state[:, -T:]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (and its cached keys/values): rejected draft tokens."""
        self.ids, self.mask, self.pos = self.ids[:, :length], self.mask[:, :length], self.pos[:, :length]
        if self.cache is not None and self.cache.get_seq_length() > length:
            self.cache.crop(length - self.cache.get_seq_length())  # negative: how many to remove


def _inverse_cdf(probs_BK: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    cdf = probs_BK.cumsum(-1)
    idx = torch.searchsorted(cdf, (u_B * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp(max=probs_BK.shape[-1] - 1)


def _keep_sorted(sp_BK: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p mask over probabilities sorted in descending order; the top token always stays."""
    rank = torch.arange(sp_BK.shape[-1], device=sp_BK.device)
    return (rank[None] < top_k_B[:, None]) & ((sp_BK.cumsum(-1) - sp_BK) < top_p_B[:, None])


def truncated_probs(logp_BK: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, filtered_B: torch.Tensor) -> torch.Tensor:
    """The distribution `sample_tokens` draws from, in id order (float64): top-k/top-p applied, renormalised."""
    probs = logp_BK.double().exp()
    sp, si = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, si, _keep_sorted(sp, top_k_B, top_p_B))
    probs = torch.where(filtered_B[:, None] & ~keep, 0.0, probs)
    return probs / probs.sum(-1, keepdim=True)


def guided_logprobs(logits_RK: torch.Tensor, n_cond: int, cfg_idx: torch.Tensor, scale_U: torch.Tensor,
                    temp_B: torch.Tensor) -> torch.Tensor:
    """Visual logits of the n_cond conditional rows then the unconditional rows of requests `cfg_idx`
    (any extra dims, e.g. positions, after the row dim) -> (n_cond, ..., K) final log-probs over the
    visual ids: u + s*(c - u) renormalised where guided, then divided by the temperature, renormalised."""
    logp = F.log_softmax(logits_RK.float(), -1)
    extra = (1,) * (logp.ndim - 1)
    comb = logp[:n_cond]
    if len(cfg_idx):
        c, u = comb[cfg_idx], logp[n_cond:]
        comb = comb.index_copy(0, cfg_idx, F.log_softmax(u + scale_U.reshape(-1, *extra) * (c - u), -1))
    return F.log_softmax(comb / temp_B.reshape(-1, *extra), -1)


def sample_tokens(logp_BK: torch.Tensor, u_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
                  filtered_B: torch.Tensor, greedy_B: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from exp(logp) by inverse CDF of the row's own uniform."""
    probs = logp_BK.double().exp()
    tokens = _inverse_cdf(probs, u_B)
    if bool(filtered_B.any()):
        sp, si = probs.sort(dim=-1, descending=True, stable=True)
        keep = _keep_sorted(sp, top_k_B, top_p_B)
        j = _inverse_cdf(sp * keep, u_B)
        tokens = torch.where(filtered_B, si.gather(-1, j[:, None]).squeeze(-1), tokens)
    if bool(greedy_B.any()):
        tokens = torch.where(greedy_B, logp_BK.argmax(-1), tokens)
    return tokens


@dataclass(frozen=True)
class DrawSettings:
    """The per-request settings of a batch as the tensors `guided_logprobs` and `sample_tokens` take,
    built in one place so that every engine turns the same `SamplingParams` into the same draw."""

    guided: list[int]  # requests with an unconditional row (cfg_scale != 1), in the order of those rows
    cfg_idx: torch.Tensor  # `guided` as a tensor
    scale: torch.Tensor  # (U, 1) float32
    temp: torch.Tensor  # (B, 1) float32; 1 where greedy (the argmax does not care)
    top_k: torch.Tensor  # (B,) long, K when unset
    top_p: torch.Tensor  # (B,) float64, 1 when unset
    filtered: torch.Tensor  # (B,) bool: top-k or top-p applies
    greedy: torch.Tensor  # (B,) bool

    @classmethod
    def of(cls, params: list[SamplingParams], K: int, device) -> DrawSettings:
        guided = [i for i, p in enumerate(params) if p.cfg_scale != 1.0]
        t = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        return cls(
            guided=guided,
            cfg_idx=t(guided, torch.long),
            scale=t([params[i].cfg_scale for i in guided], torch.float32).reshape(-1, 1),
            temp=t([1.0 if p.is_greedy else p.temperature for p in params], torch.float32)[:, None],
            top_k=t([min(p.top_k or K, K) for p in params], torch.long),
            top_p=t([p.top_p or 1.0 for p in params], torch.float64),
            filtered=t([(p.top_k is not None or p.top_p is not None) and not p.is_greedy for p in params], torch.bool),
            greedy=t([p.is_greedy for p in params], torch.bool),
        )

    def final_logprobs(self, logits_RK: torch.Tensor) -> torch.Tensor:
        """Visual logits of the B conditional rows then the U unconditional ones -> (B, ..., K) final log-probs."""
        return guided_logprobs(logits_RK, len(self.temp), self.cfg_idx, self.scale, self.temp)

    def draw(self, logp_BK: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logp_BK, u_B, self.top_k, self.top_p, self.filtered, self.greedy)


class TorchSampler:
    """Generates visual codes (and images) from a causal LM over a `Vocabulary`.

    `device` None keeps the model where it is. `use_kv_cache=False` recomputes the whole prefix
    every step, and `batch_cfg=False` runs conditional and unconditional rows as two forwards:
    both exist for the benchmark, the results are the same.
    """

    def __init__(self, model, vocab, visual_tokenizer=None, device=None, use_kv_cache: bool = True,
                 batch_cfg: bool = True, max_text_tokens: int | None = None):
        if device is not None:
            model.to(device)
        self.model = model
        self.vocab = vocab
        self.visual_tokenizer = visual_tokenizer
        self.device = next(model.parameters()).device
        self.use_kv_cache = use_kv_cache
        self.batch_cfg = batch_cfg
        self.max_text_tokens = max_text_tokens
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
        (before top-k/top-p truncation: what a training forward can recompute)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        h, w = grid
        B, N = len(prompts), h * w
        params = self._params(params, B)
        if B == 0:
            codes = torch.empty((0, h, w), dtype=torch.long)
            return (codes, torch.empty((0, N))) if return_logprobs else codes
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():  # not inference_mode: callers (GRPO) use the log-probs next to autograd tensors
                codes, logps = self._generate(prompts, N, params)
        finally:
            self.model.train(was_training)
        codes = codes.view(B, h, w).cpu()
        return (codes, logps.float().cpu()) if return_logprobs else codes

    def _generate(self, prompts, N, params):
        vocab, dev, B = self.vocab, self.device, len(prompts)
        uniforms = torch.stack([request_uniforms(resolve_seed(p), N) for p in params]).to(dev)
        K, vo = vocab.codebook_size, vocab.visual_offset
        d = DrawSettings.of(params, K, dev)
        cond = [vocab.prompt_ids(p, self.max_text_tokens) for p in prompts]
        uncond = [vocab.prompt_ids(params[i].negative_prompt, self.max_text_tokens) for i in d.guided]
        mk = lambda rows: _Stream(rows, vocab.pad_id, dev, self.use_kv_cache, self.model.config)  # noqa: E731
        streams = [mk(cond + uncond)] if (self.batch_cfg or not uncond) else [mk(cond), mk(uncond)]
        follow = torch.tensor(list(range(B)) + d.guided, device=dev)  # row r feeds the token of request follow[r]

        body = self.model.base_model
        head_w = self.model.get_output_embeddings().weight[vo: vo + K]  # visual rows only: the text ids are never scored
        codes = torch.empty((B, N), dtype=torch.long, device=dev)
        logps = torch.empty((B, N), dtype=torch.float32, device=dev)
        new_ids = [None] * len(streams)
        for t in range(N):
            # one stream: one forward of all B + U rows; two (batch_cfg=False): two full forwards, LM head included
            logits = torch.cat([s.forward(body, x) @ head_w.T for s, x in zip(streams, new_ids)], 0)  # (B + U, K)
            final = d.final_logprobs(logits)
            tok = d.draw(final, uniforms[:, t])
            codes[:, t] = tok
            logps[:, t] = final.gather(-1, tok[:, None]).squeeze(-1)
            feed = tok[follow] + vo
            new_ids = [feed[: len(cond)], feed[len(cond):]] if len(streams) == 2 else [feed]
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
