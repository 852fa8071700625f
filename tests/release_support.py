"""A stand-in for a released SimpleAR checkpoint, built the way the reference training code builds one (public
repository wdrink/SimpleAR, simpar/train/train.py): a Qwen2.5-style tokenizer (here the tiny BPE with Qwen2.5's 22
added tokens), the seven specials added after it in the reference order, the embedding rows resized to
len(tokenizer) + codebook with the new rows at the mean, tied input and output embeddings, bf16 weights, and a
config.json with transformers 4.x keys; no simplear.json (a release does not name its visual tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
PIXEL_FSQ = {"kind": "pixel-fsq", "levels": 4}  # the stand-in's visual tokenizer: 64 codes, 8 px per code


# Qwen2.5-0.5B-Instruct's generation_config.json, which a release fine-tuned from it carries along
GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def build_release(folder: Path, codebook: int = 64, seed: int = 0, spread: float = 0.0, scale: float = 1.0,
                  slow_tokenizer: bool = False) -> Path:
    """`spread`: the new rows are set apart from their mean by this much noise, as training leaves them (the rows of
    a freshly resized model are all the mean, so every code is equally likely); `scale` multiplies the (tied)
    embeddings, so that logits spread widely and greedy picks do not hinge on float noise between engines;
    `slow_tokenizer`: the tokenizer as the RL releases ship it, slow-tokenizer files only (vocab.json, merges.txt,
    a transformers 4.x tokenizer_config.json listing the added tokens, added_tokens.json), no tokenizer.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from simplear.tiny import TINY_QWEN2, build_tiny_text_tokenizer
    from simplear.vocab import SPECIALS

    tok = build_tiny_text_tokenizer()
    tok.add_tokens(QWEN25_ADDED, special_tokens=True)
    base = len(tok)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "tie_word_embeddings": True, "vocab_size": base,
                                            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}))
    tok.add_tokens(list(SPECIALS), special_tokens=True)
    with torch.no_grad():
        mean = model.get_input_embeddings().weight.mean(0)
        model.resize_token_embeddings(len(tok) + codebook, mean_resizing=False)
        model.get_input_embeddings().weight[base:] = mean
        if spread:
            model.get_input_embeddings().weight[base:] += spread * torch.randn_like(model.get_input_embeddings().weight[base:])
        model.get_input_embeddings().weight.mul_(scale)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = str(config.pop("dtype", "bfloat16")).replace("torch.", "")
    config["transformers_version"] = "4.49.0"
    config_file.write_text(json.dumps(config, indent=2))
    if slow_tokenizer:
        as_slow_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({**GENERATION_CONFIG, "eos_token_id": tok.eos_token_id,
                                                               "transformers_version": "4.49.0"}, indent=2))
    return folder


def as_slow_tokenizer(folder: Path) -> Path:
    """The folder's tokenizer files rewritten as transformers 4.x writes a slow Qwen2 tokenizer's (as the RL releases
    ship it), in place of tokenizer.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.backend_tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer.json").unlink()
    added = {t.content: i for i, t in sorted(tok.added_tokens_decoder.items())}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    specials = {"eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token}
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 4096, "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False, **specials,
              "added_tokens_decoder": {str(i): {"content": c, **flags} for c, i in added.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder
