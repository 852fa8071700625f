"""The chunked loss gives the full-logits loss and its gradients, and its logits never exist whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from simplear.losses import IGNORE_INDEX, causal_lm_cross_entropy, chunked_cross_entropy


def _model(tied: bool):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=tied))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (3, 37), generator=g)
    labels = ids.clone()
    labels[0, 30:] = IGNORE_INDEX  # padding
    labels[2, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(37).expand(3, 37), "labels": labels}


def test_chunked_loss_and_gradients_equal_the_full_logits_ones():
    for tied in (False, True):
        m, x = _model(tied), _batch()
        out = m(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"], use_cache=False)
        ref = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, 1000), x["labels"][:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(3, 36)
        ref.sum().backward()
        want = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        got = causal_lm_cross_entropy(m, x, chunk=16)  # 16 < the 100 labelled positions: several chunks
        got.sum().backward()
        assert torch.allclose(got, ref, atol=1e-5) and (got[0, 29:] == 0).all()
        assert max((p.grad - want[n]).abs().max().item() for n, p in m.named_parameters()) < 1e-4


def test_only_one_chunk_of_logits_is_alive_at_a_time():
    """The largest tensor saved for backward is a chunk's input, never a (positions x vocab) block."""
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(5000, 32, requires_grad=True)
    target = torch.randint(0, 5000, (300,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce = chunked_cross_entropy(hidden, weight, target, chunk=64)
    ce.sum().backward()
    assert max(saved) < 64 * 5000  # the full logits would be 300 x 5000
    assert torch.allclose(ce, F.cross_entropy(hidden @ weight.T, target, reduction="none"), atol=1e-4)


def test_a_batch_without_labels_still_has_a_graph():
    hidden = torch.randn(4, 8, requires_grad=True)
    ce = chunked_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), IGNORE_INDEX))
    ce.sum().backward()
    assert (ce == 0).all() and hidden.grad is not None
