"""The recaption demo's model: a random Qwen2-VL small enough for 2 CPU cores, built from a spec (no hub is
reachable here), with a BPE tokenizer trained on a few strings and Qwen2-VL's chat template; head_dim 32 so
vLLM's CPU attention takes it. Loaded like any checkpoint once written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from pydantic import Field, model_validator

from simplear.config import StrictModel


class TinyQwen2VL(StrictModel):
    """A random Qwen2-VL small enough for 2 CPU cores; head_dim = hidden_size / num_attention_heads must be >= 32 for vLLM."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_embed_dim: int = 64
    vision_depth: int = 1
    vision_num_heads: int = 2
    vocab_size: int = Field(400, ge=64, description="BPE vocabulary trained on a few strings (upper bound)")
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim(self):
        head_dim, rem = divmod(self.hidden_size, self.num_attention_heads)
        if rem or head_dim < 32 or head_dim % 4:
            raise ValueError("hidden_size / num_attention_heads must be a whole multiple of 4 and >= 32")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2vl(folder: Path, spec: TinyQwen2VL, prompts: Sequence[str] = ()) -> Path:
    """Write a random Qwen2-VL (weights, tokenizer, processor, chat template) in HF layout; same spec and prompts,
    same files. `prompts`: text the BPE vocabulary is also trained on (the stage's own prompts)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from pipelines.demo_shapes import PALETTE, SHAPES

    corpus = [f"a {c} {s} on a {b} background" for c in PALETTE for s in SHAPES for b in list(PALETTE)[:3]]
    corpus += ["You are a helpful assistant.", "system user assistant", *prompts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2  # mrope splits the rotary half over (t, h, w) like Qwen2-VL's [16, 24, 24] of 64
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            **special,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed_dim,
            hidden_size=spec.hidden_size,
            num_heads=spec.vision_num_heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
        **special,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.rename(tmp, folder)  # whole or not at all; an actor that built it first keeps its copy
    except OSError:
        if not (folder / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
