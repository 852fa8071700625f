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


class EagerRecorder:
    """`CudaGraphs`' protocol on CPU: a recording is the step itself, run again on its input buffers at each replay.
    It rehearses the captured path's bookkeeping (one recording per length bucket, static input buffers, the warm-up's
    write undone) where no CUDA is; `recorded` lists each recording's key/value span, from its mask input."""

    def __init__(self, bucket: int):
        self.bucket, self.recorded = bucket, []

    def warm_up(self, run) -> None:
        run()

    def record(self, run):
        self.recorded.append(run.__defaults__[0].shape[-1])  # the recording's mask input: (R, 1, 1, span)
        return run
