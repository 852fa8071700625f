"""A tiny model with sharp logits, shared by the sampler and Jacobi tests."""

import torch

from simplear.model import build_model


def sharp_tiny_model(vocab):
    """Seeded tiny Qwen2, sharper than a fresh init so prompts and positions visibly change the logits."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab, num_hidden_layers=2)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40)
        model.get_output_embeddings().weight.mul_(8)
    return model.eval()
