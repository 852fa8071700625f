"""Speculative Jacobi decoding (SJD, Teng et al. 2024; SimpleAR's Table 6) for the torch engine, on the KV cache.

Each step runs the last decided token plus a window of W draft tokens through the model in one
forward (on the KV cache of the accepted prefix), giving the target distribution p at every
window position. Drafts are verified left to right: draft x with draft distribution q is kept with
probability min(1, p(x)/q(x)); the first rejected one is replaced by a draw from (p - q)+
(renormalised) and the step ends. The cache is cropped back to the accepted tokens, and the drafts
after the rejected one are renewed by the Jacobi iteration: a draw from the p this very forward
gave them (q := p). New window slots get a draw from the distribution of the furthest position
the last forward reached (`draft_init="last"`: neighbouring visual tokens are alike, so such drafts
are often right), or, as in the paper, a uniform draw over the visual ids (`"uniform"`). Every step
decides at least one token.

Randomness: every uniform of an image comes from its request's stream (`request_stream(seed)`, the
torch engine's), in the order SJD needs them, and a draw from a target p is the torch engine's own
(`DrawSettings.draw`, inverse CDF). Hence the same seed gives the torch engine's codes exactly where
decoding is deterministic given the stream: greedy (temperature 0, or top_k=1) accepts a draft iff
it is the argmax, so greedy SJD gives exactly the codes of greedy plain decoding; and the first
token of every image is the torch engine's (the same uniform 0, the same draw). Beyond that, sampled
SJD draws the same distribution but not the same image: the torch engine's token t is F_t^-1(u_t),
while SJD's token at t is a draft kept with probability min(1, p/q) (a function of the draft and of
another uniform) or a residual draw, which equals F_t^-1(u_t) only by chance. Exact equality would
need accepting a draft iff it equals F_t^-1(u_t), i.e. plain Jacobi iteration with frozen noise,
which gives up the min(1, p/q) acceptance that lets SJD accept drafts under random sampling.

The reference implementation has no KV cache and re-runs the whole sequence every iteration, so
fewer steps brought no speed; here a step costs one forward of W + 1 tokens on the cache, so fewer
steps mean less time. p is the torch engine's own distribution (`guided_logprobs`: CFG over the
visual ids, temperature; `truncated_probs`: top-k/top-p), computed for all positions of a step at
once. Images are decoded one at a time (each with its CFG row pair): images of a batch accept
different numbers of tokens per step, and SJD is a latency tool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simplear.sampler import (DrawSettings, SamplingParams, TorchSampler, _inverse_cdf, _Stream, request_stream,
                             resolve_seed, truncated_probs)


@dataclass
class JacobiStats:
    steps: list[int]  # model forwards per image, prefill included (plain decoding takes h*w)
    tokens: int  # h*w

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / max(len(self.steps), 1)

    @property
    def compression(self) -> float:
        """Plain decoding's steps over SJD's: tokens decided per forward."""
        return self.tokens / self.mean_steps if self.steps else 0.0


class JacobiSampler:
    """`generate_codes` / `generate_images` like `TorchSampler`, decoded by SJD with a window of `window` drafts
    (new ones drawn as `draft_init` says)."""

    def __init__(self, sampler: TorchSampler, window: int = 16, draft_init: str = "last"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if draft_init not in ("last", "uniform"):
            raise ValueError(f"draft_init must be 'last' or 'uniform', got {draft_init!r}")
        self.draft_init = draft_init
        if not sampler.use_kv_cache:
            raise ValueError("speculative Jacobi decoding runs on the KV cache: give a TorchSampler with use_kv_cache=True")
        self.sampler = sampler
        self.window = window
        self.vocab = sampler.vocab
        self.visual_tokenizer = sampler.visual_tokenizer
        self.last_stats: JacobiStats | None = None

    _params = TorchSampler._params
    generate_images = TorchSampler.generate_images  # decode + PIL on top of `generate_codes`

    def generate_codes(self, prompts: list[str], grid: tuple[int, int], params=None, return_stats: bool = False):
        """Codes (B, h, w) on CPU; with `return_stats`, also a `JacobiStats` (also kept as `last_stats`)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        h, w = grid
        params = self._params(params, len(prompts))
        model = self.sampler.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                results = [self._decode(prompt, h * w, p) for prompt, p in zip(prompts, params)]
        finally:
            model.train(was_training)
        codes = torch.tensor([r[0] for r in results], dtype=torch.long).view(len(prompts), h, w)
        self.last_stats = JacobiStats(steps=[r[1] for r in results], tokens=h * w)
        return (codes, self.last_stats) if return_stats else codes

    def _decode(self, prompt: str, N: int, p: SamplingParams) -> tuple[list[int], int]:
        s, vocab = self.sampler, self.vocab
        dev, K, vo = s.device, vocab.codebook_size, vocab.visual_offset
        rows = [vocab.prompt_ids(prompt, s.max_text_tokens)]
        if p.cfg_scale != 1.0:
            rows.append(vocab.prompt_ids(p.negative_prompt, s.max_text_tokens))
        R = len(rows)
        stream = _Stream(rows, vocab.pad_id, dev, True, s.model.config)
        body = s.model.base_model
        head_w = s.model.get_output_embeddings().weight[vo: vo + K]
        on_dev, d = DrawSettings.of([p], K, dev), DrawSettings.of([p], K, torch.device("cpu"))
        gen = request_stream(resolve_seed(p))
        greedy = p.is_greedy

        def uniform() -> torch.Tensor:
            return torch.rand(1, generator=gen, dtype=torch.float64)

        def targets(hidden_RTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """(T, K) final log-probs and, unless greedy, the float64 distribution sampling draws from; on CPU."""
            final = on_dev.final_logprobs(hidden_RTH @ head_w.T)[0].cpu()
            if greedy:
                return final, None
            T = final.shape[0]
            return final, truncated_probs(final, d.top_k.expand(T), d.top_p.expand(T), d.filtered.expand(T))

        def draw(final_K: torch.Tensor) -> int:
            """A draw from a target position's distribution, as the torch engine draws."""
            return int(d.draw(final_K[None], uniform())[0])

        def draw_from(probs_K: torch.Tensor) -> int:
            """A draw from any other distribution (a residual), unnormalised."""
            return int(_inverse_cdf(probs_K[None], uniform())[0])

        Fin, P = targets(stream.extend(body, None)[:, -1:])  # prefill: the first image position
        steps = 1
        head = draw(Fin[0])
        last = (Fin[0], None if greedy else P[0])  # the distribution of the furthest position a forward has seen
        drafts: list[int] = []
        q: list[torch.Tensor | None] = []  # each draft's distribution; None: uniform over the K codes
        out: list[int] = []
        while True:
            out.append(head)
            if len(out) == N:
                return out, steps
            m = min(self.window, N - len(out))  # no drafts past the image's end
            while len(drafts) < m:  # new window slots
                if self.draft_init == "uniform":
                    drafts.append(min(int(float(uniform()) * K), K - 1))
                    q.append(None)
                else:
                    drafts.append(draw(last[0]))
                    q.append(last[1])
            drafts, q = drafts[:m], q[:m]
            L0 = stream.ids.shape[1]
            feed = (torch.tensor([head] + drafts, dtype=torch.long, device=dev) + vo).expand(R, -1)
            Fin, P = targets(stream.extend(body, feed))  # row i: the position after fed token i; it verifies drafts[i]
            steps += 1
            n = 0
            while n < m:
                x = drafts[n]
                if greedy:
                    ok = x == int(Fin[n].argmax())
                else:
                    qx = 1.0 / K if q[n] is None else float(q[n][x])
                    ok = float(uniform()) * qx < float(P[n, x])
                if not ok:
                    break
                out.append(x)
                n += 1
                if len(out) == N:
                    return out, steps
            stream.truncate(L0 + 1 + n)  # keep head + accepted drafts; the rejected tail leaves the cache
            last = (Fin[m], None if greedy else P[m])
            if n == m:
                head, drafts, q = draw(Fin[m]), [], []
                continue
            if greedy:
                head = draw(Fin[n])
            else:
                residual = (P[n] - (1.0 / K if q[n] is None else q[n])).clamp(min=0)
                head = draw_from(residual) if residual.sum() > 0 else draw(Fin[n])
            # Jacobi renewal: the drafts after the rejected one, drawn from this step's distributions
            drafts = [draw(Fin[i]) for i in range(n + 1, m + 1)]
            q = [None if greedy else P[i] for i in range(n + 1, m + 1)]
