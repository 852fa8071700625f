"""Next-token cross-entropy over a 215.7k-row head without ever holding the full logits.

The joint vocabulary (Qwen2.5's 151,665 text tokens + 7 specials + 64,000 visual codes) makes the
logits of one micro-batch the largest tensor of a training step: at pretraining's 8 x 1,282 tokens
they are 2.2 G values, 4.4 GiB in bf16 and 8.8 GiB again as the fp32 copy the loss wants, plus as much
for their gradient. Here the head is applied `chunk` positions at a time and only to positions that
have a label; each chunk's fp32 logits are recomputed in backward (activation checkpointing), so at
any moment one chunk's logits exist: `chunk x vocab x 4` bytes (0.9 GiB at 1,024 x 215.7k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    logits_NV = F.linear(hidden_NH, weight_VH).float()
    return F.cross_entropy(logits_NV, target_N, reduction="none")


def chunked_cross_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_N: torch.Tensor,
                          chunk: int = 1024) -> torch.Tensor:
    """Per-position cross-entropy of `hidden @ weight.T` against `target` (the same values as
    `F.cross_entropy(logits.float(), target, reduction="none")`), 0 where the target is IGNORE_INDEX."""
    out_N = torch.zeros(target_N.shape, dtype=torch.float32, device=hidden_NH.device)
    keep = (target_N != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    if keep.numel() == 0:
        return out_N + 0.0 * hidden_NH.sum()  # still part of the graph: every rank runs the same backward
    h_KH, t_K = hidden_NH.index_select(0, keep), target_N.index_select(0, keep)
    pieces = [checkpoint(_chunk_ce, h_KH[s:s + chunk], weight_VH, t_K[s:s + chunk], use_reentrant=False)
              for s in range(0, keep.numel(), chunk)]
    return out_N.index_put((keep,), torch.cat(pieces))


def causal_lm_cross_entropy(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """(B, L-1) cross-entropy of a Hugging Face causal LM on `batch` (input_ids, attention_mask,
    position_ids, labels), position t predicting labels[t + 1], through `chunked_cross_entropy`.

    The model runs whole (so DDP's and FSDP2's forward hooks see it) but computes logits for one
    position only (`logits_to_keep=1`); the loss takes the last hidden state (after the final norm)
    and the output embedding's weight, which FSDP2 keeps unsharded from the root's forward to its backward."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                use_cache=False, logits_to_keep=1, output_hidden_states=True)
    hidden_BLH = out.hidden_states[-1][:, :-1]
    target_BL = batch["labels"][:, 1:]
    core = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 shards in place
    weight_VH = core.get_output_embeddings().weight
    # keep the one-position logits in the graph: DDP expects a gradient for every parameter it saw used
    ce_N = chunked_cross_entropy(hidden_BLH.reshape(-1, hidden_BLH.shape[-1]), weight_VH, target_BL.reshape(-1), chunk)
    return ce_N.view_as(target_BL) + 0.0 * out.logits.sum()
