"""Speculative Jacobi decoding (SJD, Teng et al. 2024; SimpleAR's Table 6) for the torch engine, on the KV cache.

Each step runs, for every image of the batch, the last decided token plus a window of W draft tokens through the
model in one forward (on the static KV cache of the accepted prefix), giving the target distribution p at every
window position. Drafts are verified left to right: draft x with draft distribution q is kept with probability
min(1, p(x)/q(x)); the first rejected one is replaced by a draw from (p - q)+ (renormalised) and the image's step
ends. Each image keeps its own accepted tokens (`KVRows.keep`: the rejected tail leaves its cache rows), and the
drafts after the rejected one are renewed by the Jacobi iteration: a draw from the p this very forward gave them
(q := p). New window slots get a draw from the distribution of the furthest position the last forward reached
(`draft_init="last"`: neighbouring visual tokens are alike, so such drafts are often right), or, as in the paper, a
uniform draw over the visual ids (`"uniform"`). Every step decides at least one token per image.

The whole step runs on the device, for all images at once: verification is a cumulative product over the window,
draws are inverse CDFs of the target rows, and the only value read back per step is whether some image is done;
a finished image leaves the batch (its rows leave the cache), so the others' forwards stop paying for it. p is the
torch engine's own distribution (`DrawSettings.final_logprobs`: CFG over the visual ids, temperature;
`DrawSettings.truncated`: top-k/top-p, sorted only when some image truncates).

Randomness: every uniform of an image comes from its request's stream (`request_uniforms(seed)`), in a fixed layout
so that a step needs no count of what the last one used: uniform 0 draws the first token exactly as the torch engine
does (`DrawSettings.draw`), uniforms 1..W the first drafts, then each step takes the next 2W + 1: W to verify the
window, 1 for the replacement (or next) token, W for the next drafts. So the same seed gives the same image whatever
else is in the batch, and the first token of every image is the torch engine's. Greedy decoding (temperature 0, or
top_k=1) accepts a draft iff it is the argmax, so greedy SJD gives exactly the codes of greedy plain decoding. Beyond
that, sampled SJD draws the torch engine's distribution but not its image: a draft kept with probability
min(1, p/q) is not the inverse CDF of the torch engine's uniform t, and equality would need plain Jacobi iteration
with frozen noise, which gives up the acceptance that lets SJD accept drafts under random sampling.

The reference implementation has no KV cache and re-runs the whole sequence every iteration, so fewer steps brought
no speed; here a step costs one forward of W + 1 tokens per row on the cache. Whether that pays depends on how often
drafts are right (the model's entropy) and on what W + 1 scored positions cost next to one (the LM head): see
benchmarks/README.md. Serving keeps it off unless `sjd_window` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simplear.sampler import SamplingParams, TorchSampler
from simplear.sampling.draw import DrawSettings, inverse_cdf, request_uniforms, resolve_seed, visual_mode_only
from simplear.sampling.rows import KVRows, VisualHead, drawing


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
    (new ones drawn as `draft_init` says); the images of a call are decoded together."""

    def __init__(self, sampler: TorchSampler, window: int = 16, draft_init: str = "last"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if draft_init not in ("last", "uniform"):
            raise ValueError(f"draft_init must be 'last' or 'uniform', got {draft_init!r}")
        if not sampler.use_kv_cache:
            raise ValueError("speculative Jacobi decoding runs on the KV cache: give a TorchSampler with use_kv_cache=True")
        self.draft_init = draft_init
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
        visual_mode_only(params, "speculative Jacobi decoding")
        with drawing(self.sampler.model), torch.inference_mode():
            codes, steps = self._decode(prompts, h * w, params)
        self.last_stats = JacobiStats(steps=steps.tolist(), tokens=h * w)
        codes = codes.view(len(prompts), h, w).cpu()
        return (codes, self.last_stats) if return_stats else codes

    def _decode(self, prompts: list[str], N: int, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        s, vocab, W = self.sampler, self.vocab, self.window
        dev, K, vo, B = s.device, vocab.codebook_size, vocab.visual_offset, len(prompts)
        d = DrawSettings.of(params, K, dev)
        sampled = not all(p.is_greedy for p in params)  # else no image needs the float64 distributions
        block = 2 * W + 1  # uniforms per step: verification, replacement, next drafts
        u_all = torch.stack([request_uniforms(resolve_seed(p), 1 + W + (N - 1) * block) for p in params]).to(dev)
        rows = KVRows(s.model, VisualHead(s.model, vocab), s.prompt_rows(prompts, params, d), vocab.pad_id,
                      capacity=N + W + 1)  # a row holds at most N tokens, then a forward's W + 1 at its end
        follow = torch.tensor(list(range(B)) + d.guided, device=dev)  # row r feeds the tokens of image follow[r]
        ar, win = torch.arange(B, device=dev), torch.arange(W, device=dev)
        codes = torch.zeros((B, N + W + 1), dtype=torch.long, device=dev)  # slack: writes past the end land there

        def targets(logits):
            """Final log-probs (B, T, K), argmaxes (B, T) and, when some image samples, the distributions (B, T, K)."""
            final = d.final_logprobs(logits)
            return final, final.argmax(-1), d.truncated(final) if sampled else None

        def draws(P, amax, src, u_BW, new_slot):
            """Window drafts: from target row src[b, k] of this forward (argmax where greedy), uniform over the codes in
            new slots when `draft_init="uniform"`; with their draft distributions' row (-1: uniform)."""
            x = amax.gather(1, src)
            if sampled:
                cand = inverse_cdf(P, u_BW[:, None, :].expand(-1, P.shape[1], -1))  # (B, T, W): every row, every uniform
                x = torch.where(d.greedy[:, None], x, cand[ar[:, None], src, win])
            if self.draft_init == "uniform":
                x = torch.where(new_slot, (u_BW * K).long().clamp(max=K - 1), x)
                src = torch.where(new_slot, -1, src)
            return x, src

        final, amax, P = targets(rows.prefill()[:, None])
        head = d.draw(final[:, 0], u_all[:, 0])  # the torch engine's first token
        codes[:, 0] = head
        count = torch.ones(B, dtype=torch.long, device=dev)  # decided tokens, the head (not yet fed) included
        steps = torch.ones(B, dtype=torch.long, device=dev)
        drafts, q_src = draws(P, amax, torch.zeros((B, W), dtype=torch.long, device=dev), u_all[:, 1: 1 + W],
                              torch.ones((B, W), dtype=torch.bool, device=dev))
        prev = P  # the distributions the drafts were drawn from, indexed by q_src
        order = torch.arange(B, device=dev)  # the call's index of each image still in the batch
        out_codes, out_steps = torch.empty((B, N), dtype=torch.long, device=dev), torch.empty_like(steps)
        for step in range(N):  # a step decides at least one token of each image: the last pass only collects
            done = count >= N
            if bool(done.any()):  # the one read per step: finished images leave, and forwards stop paying for them
                out_codes[order[done]], out_steps[order[done]] = codes[done, :N], steps[done]
                keep = (~done).nonzero().squeeze(1)
                if not len(keep):
                    break
                kept = keep.tolist()
                uncond_rows = [len(params) + j for j, i in enumerate(d.guided) if not bool(done[i])]
                rows.select(torch.tensor(kept + uncond_rows, device=dev))
                params = [params[i] for i in kept]
                d = DrawSettings.of(params, K, dev)
                sampled = not all(p.is_greedy for p in params)
                follow = torch.tensor(list(range(len(kept))) + d.guided, device=dev)
                ar = torch.arange(len(kept), device=dev)
                order, codes, count, head, drafts, q_src, steps, u_all = (
                    x[keep] for x in (order, codes, count, head, drafts, q_src, steps, u_all))
                prev = prev[keep] if sampled else None
            u = u_all[:, 1 + W + step * block: 1 + W + (step + 1) * block]
            feed = torch.cat([head[:, None], drafts], 1) + vo
            final, amax, P = targets(rows.forward(feed[follow]))  # position i: after fed token i; it verifies drafts[i]
            steps += 1
            m = (N - count).clamp(max=W)  # drafts inside the image
            ok = drafts == amax[:, :W]
            if sampled:
                p_x = P[:, :W].gather(-1, drafts[..., None]).squeeze(-1)
                q_x = torch.where(q_src >= 0, prev[ar[:, None], q_src.clamp(min=0), drafts], 1.0 / K)
                ok = torch.where(d.greedy[:, None], ok, u[:, :W] * q_x < p_x)
            n = (ok & (win < m[:, None])).long().cumprod(1).sum(1)  # accepted drafts
            # the replacement of the first rejected draft, or the token after the window when all were kept
            head = amax[ar, n]
            if sampled:
                p_n = P[ar, n]
                rejected = (n < m)[:, None]
                src_n = q_src.gather(1, n.clamp(max=W - 1)[:, None]).squeeze(1)
                q_n = torch.where((src_n >= 0)[:, None], prev[ar, src_n.clamp(min=0)], 1.0 / K)
                residual = torch.where(rejected, (p_n - q_n).clamp(min=0), p_n)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p <= q only by float noise
                head = torch.where(d.greedy, head, inverse_cdf(residual, u[:, W: W + 1])[:, 0])
            pos = count[:, None] + win
            codes.scatter_(1, pos, torch.where(win < n[:, None], drafts, codes.gather(1, pos)))
            codes.scatter_(1, (count + n)[:, None], head[:, None])
            rows.keep((n + 1)[follow])  # the fed head and the accepted drafts
            # next window: renewed drafts from this forward's rows n+1..m, then new slots from row m (the furthest)
            src = torch.minimum(n[:, None] + 1 + win, m[:, None])
            drafts, q_src = draws(P, amax, src, u[:, W + 1:], n[:, None] + 1 + win > m[:, None])
            prev = P
            count = (count + n + 1).clamp(max=N)
        return out_codes, out_steps
