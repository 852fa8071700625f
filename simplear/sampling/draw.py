"""The distribution every engine draws a visual token from, and the uniforms it draws with.

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

Greedy: `greedy=True` or `temperature=0` takes the argmax of the CFG-combined log-probs (a temperature
between 0 and `MIN_TEMPERATURE` is refused: see simplear.sampling.spec).

No function here reads a tensor back to the host: which rows are truncated or greedy is known when
the batch is built (`DrawSettings`), so a decode step never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simplear.sampling.spec import PROMPT_SLOT, check_temperature, check_template


@dataclass
class SamplingParams:
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: drawn from torch's global RNG (so torch.manual_seed makes runs repeatable)
    negative_prompt: str = ""  # the unconditional prompt of CFG; "" is the dropped caption of training
    prompt_template: str = PROMPT_SLOT  # the conditional text, the prompt in its slot
    greedy: bool = False
    reference_mode: bool = False  # drawn over every id as the reference's HF generate draws (the torch engine only)
    repetition_penalty: float = 1.0  # reference mode: HF's, on the conditional logits of the ids in the row

    def __post_init__(self):
        check_temperature(self.temperature)
        check_template(self.prompt_template)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def is_filtered(self, K: int) -> bool:
        """Whether top-k / top-p leaves out any of K codes (k >= K or p = 1 keep them all: nothing to sort)."""
        return not self.is_greedy and ((self.top_k or K) < K or (self.top_p or 1.0) < 1.0)

    def conditional(self, prompt: str) -> str:
        """The text of the conditional row: the prompt in the template (a plain replace: braces in it stay)."""
        return self.prompt_template.replace(PROMPT_SLOT, prompt)


def visual_mode_only(params: list[SamplingParams], engine: str) -> None:
    """The engines that draw among the visual ids only refuse the reference mode (it needs every id's logit)."""
    if any(p.reference_mode for p in params):
        raise ValueError(f"{engine} draws among the visual ids only: the reference sampling mode runs on the torch "
                         "engine (engine: torch, without sjd_window)")


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list or tensor on `device`: to a GPU from pinned memory without waiting for the queue (a copy from
    pageable memory waits for every kernel queued before it); on the CPU, as it is."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def resolve_seed(p: SamplingParams) -> int:
    """Without a seed a request gets one from torch's global RNG, so torch.manual_seed still repeats a run."""
    return p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())


def request_stream(seed: int) -> torch.Generator:
    """The source of every uniform a request with this seed uses, in every engine (see the module docstring)."""
    return torch.Generator().manual_seed(seed)


def request_uniforms(seed: int, n: int) -> torch.Tensor:
    """The first n uniforms of the request's stream (float64, CPU): uniform t draws token t."""
    return torch.rand(n, generator=request_stream(seed), dtype=torch.float64)


def inverse_cdf(probs_XK: torch.Tensor, u_XM: torch.Tensor) -> torch.Tensor:
    """M draws per row of unnormalised probabilities (any leading dims X), one per uniform: (X, M) indices."""
    cdf = probs_XK.cumsum(-1)
    return torch.searchsorted(cdf, u_XM * cdf[..., -1:], right=True).clamp(max=probs_XK.shape[-1] - 1)


def _keep_sorted(sp_BK: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p mask over probabilities sorted in descending order; the top token always stays."""
    rank = torch.arange(sp_BK.shape[-1], device=sp_BK.device)
    return (rank[None] < top_k_B[:, None]) & ((sp_BK.cumsum(-1) - sp_BK) < top_p_B[:, None])


def truncated_probs(logp_BK: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, filtered_B: torch.Tensor,
                    any_filtered: bool) -> torch.Tensor:
    """The distribution `sample_tokens` draws from, in id order (float64): top-k/top-p applied, renormalised.
    Without truncation in the batch there is nothing to sort (a float64 sort of every row is most of the cost)."""
    probs = logp_BK.double().exp()
    if any_filtered:
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
                  filtered_B: torch.Tensor, greedy_B: torch.Tensor, *, any_filtered: bool, any_greedy: bool) -> torch.Tensor:
    """Draw one index per row from exp(logp) by inverse CDF of the row's own uniform."""
    probs = logp_BK.double().exp()
    tokens = inverse_cdf(probs, u_B[:, None])[:, 0]
    if any_filtered:
        sp, si = probs.sort(dim=-1, descending=True, stable=True)
        keep = _keep_sorted(sp, top_k_B, top_p_B)
        j = inverse_cdf(sp * keep, u_B[:, None])
        tokens = torch.where(filtered_B, si.gather(-1, j).squeeze(-1), tokens)
    if any_greedy:
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
    any_filtered: bool  # `filtered.any()`, known on the host so that no step reads it back
    any_greedy: bool

    @classmethod
    def of(cls, params: list[SamplingParams], K: int, device) -> DrawSettings:
        guided = [i for i, p in enumerate(params) if p.cfg_scale != 1.0]
        t = lambda values, dtype: to_device(values, dtype, device)  # noqa: E731
        return cls(
            guided=guided,
            cfg_idx=t(guided, torch.long),
            scale=t([params[i].cfg_scale for i in guided], torch.float32).reshape(-1, 1),
            temp=t([1.0 if p.is_greedy else p.temperature for p in params], torch.float32)[:, None],
            top_k=t([min(p.top_k or K, K) for p in params], torch.long),
            top_p=t([p.top_p or 1.0 for p in params], torch.float64),
            filtered=t([p.is_filtered(K) for p in params], torch.bool),
            greedy=t([p.is_greedy for p in params], torch.bool),
            any_filtered=any(p.is_filtered(K) for p in params),
            any_greedy=any(p.is_greedy for p in params),
        )

    def final_logprobs(self, logits_RK: torch.Tensor) -> torch.Tensor:
        """Visual logits of the B conditional rows then the U unconditional ones -> (B, ..., K) final log-probs."""
        return guided_logprobs(logits_RK, len(self.temp), self.cfg_idx, self.scale, self.temp)

    def draw(self, logp_BK: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logp_BK, u_B, self.top_k, self.top_p, self.filtered, self.greedy,
                             any_filtered=self.any_filtered, any_greedy=self.any_greedy)

    def truncated(self, logp_BTK: torch.Tensor) -> torch.Tensor:
        """`truncated_probs` of (B, T, K) final log-probs, each request's settings at all its T positions."""
        B, T, K = logp_BTK.shape
        rows = lambda x: x.repeat_interleave(T)  # noqa: E731
        probs = truncated_probs(logp_BTK.reshape(B * T, K), rows(self.top_k), rows(self.top_p), rows(self.filtered),
                                self.any_filtered)
        return probs.view(B, T, K)
