"""Log-probs over the visual ids, as the sampler draws them.

Recomputed for the policy and for the frozen reference (the KL term) over the sampled visual tokens
under the sampler's own distribution: visual ids only, CFG-combined when `cfg_scale != 1` (the
unconditional rows run too), divided by the temperature: the sampler's own formula
(`simplear.sampling.draw.DrawSettings.final_logprobs`), so on-policy the importance ratio is exactly 1 and the KL to
the reference is 0 at the first step.
"""

from __future__ import annotations

import types

from simplear.sampling.draw import DrawSettings, SamplingParams


def install_visual_head(model, vocab) -> None:
    """`model(input_ids, attention_mask, position_ids, visual_head=T)` -> logits (B, T, codebook) of the last T
    tokens over the visual rows of the LM head only. Patched onto the instance, so DDP's forward hooks run."""
    inner = model.forward
    vo, K = vocab.visual_offset, vocab.codebook_size

    def forward(self, *args, visual_head: int | None = None, **kwargs):
        if visual_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, -visual_head - 1: -1]
        head = self.get_output_embeddings()
        logits = hidden @ head.weight[vo: vo + K].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[vo: vo + K]
        return logits.float()

    model.forward = types.MethodType(forward, model)


def visual_logps(model, input_ids, attention_mask, n_completion: int, vocab, params: SamplingParams,
                 uncond_ids: list[int], compute_entropy: bool = False):
    """Per-token log-probs (B, T) of the completion's visual tokens under the sampler's distribution, and entropies."""
    import torch
    import torch.nn.functional as F

    B = input_ids.size(0)
    completion = input_ids[:, -n_completion:]
    rows, mask = input_ids, attention_mask
    settings = DrawSettings.of([params] * B, vocab.codebook_size, input_ids.device)
    cfg = bool(settings.guided)
    if cfg:  # unconditional rows: the negative prompt followed by the same completion
        u = torch.tensor(uncond_ids, dtype=input_ids.dtype, device=input_ids.device).expand(B, -1)
        u_rows = torch.cat([u, completion], 1)
        u_mask = torch.cat([torch.ones_like(u), attention_mask[:, -n_completion:]], 1)
        L = max(rows.size(1), u_rows.size(1))
        pad = lambda t, v: F.pad(t, (L - t.size(1), 0), value=v)  # noqa: E731  (left padding)
        rows = torch.cat([pad(rows, vocab.pad_id), pad(u_rows, vocab.pad_id)])
        mask = torch.cat([pad(mask, 0), pad(u_mask, 0)])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits_BTK = model(input_ids=rows, attention_mask=mask, position_ids=position_ids, visual_head=n_completion)
    final = settings.final_logprobs(logits_BTK)
    codes = completion - vocab.visual_offset
    valid = (codes >= 0) & (codes < vocab.codebook_size)
    token_logp = final.gather(-1, codes.clamp(0, vocab.codebook_size - 1).unsqueeze(-1)).squeeze(-1) * valid
    entropy = None
    if compute_entropy:  # logged only: no graph for it (it would keep a (B, T, codebook) tensor for backward)
        with torch.no_grad():
            detached = final.detach()
            entropy = -(detached.exp() * detached).sum(-1)
    return token_logp, entropy

