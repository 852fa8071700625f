"""Tiny offline stand-ins for the hub models: a BPE text tokenizer trained here and a tiny Qwen2 preset.

No model hub is reachable on our machines, so the demo profile and the tests build these from
code. The tokenizer is trained on a fixed built-in corpus, so every call gives the same vocabulary.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

# head_dim = hidden_size / num_attention_heads = 32: vLLM's CPU attention supports head_dim >= 32 only.
TINY_QWEN2 = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
)

# A tiny random open_clip model, seeded: the demo's clip_score is a plumbing check (the stage runs and reports),
# never a quality figure. `model: simplear-tiny-clip` with `pretrained: null` selects it.
TINY_CLIP_NAME = "simplear-tiny-clip"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"

COLOURS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta teal navy "
    "olive maroon lime gold silver beige violet indigo turquoise crimson"
).split()
SHAPES = (
    "circle square triangle rectangle star ellipse oval diamond hexagon pentagon cross ring disc "
    "dot line stripe heart"
).split()
COMMON = (
    "a an the on in of and with at to is are it this that picture photo image of small large big "
    "tiny left right top bottom center middle background foreground over under near two three one "
    "four five six seven eight nine ten shape shapes colour color coloured colored bright dark "
    "light plain simple drawing painting rendering scene object objects there next behind front "
    "above below beside for by from as high quality detailed"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(COLOURS), " ".join(SHAPES), " ".join(COMMON), "0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 256 512 1024"]
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            bg = COLOURS[(i + j + 1) % len(COLOURS)]
            lines.append(f"a {c} {s} on a {bg} background")
            if (i + j) % 3 == 0:
                lines.append(f"A photo of a small {c} {s} at the top left of a plain {bg} background.")
    return lines


def build_tiny_text_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, nothing is unknown) with pad/eos/unk specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=4096
    )
