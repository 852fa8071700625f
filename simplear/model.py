"""The AR transformer: a plain `Qwen2ForCausalLM` over the joint vocabulary, and self-describing checkpoints.

A checkpoint folder is a Hugging Face model folder (config.json, safetensors, the text tokenizer
with the specials) plus `simplear.json` (vocabulary metadata, the visual tokenizer config, extra).
vLLM can load the folder as an ordinary Qwen2 model; `simplear.json`, written last, marks it done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simplear.sampling.spec import DEFAULT_SAMPLING, SamplingSpec, recorded_sampling
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import META_FILE, Vocabulary, _write_json_atomic

FORMAT = "simplear-checkpoint"
FORMAT_VERSION = 1


def _special_ids(vocab: Vocabulary) -> dict:
    tok = vocab.text_tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else vocab.pad_id
    return dict(pad_token_id=vocab.pad_id, eos_token_id=eos, bos_token_id=getattr(tok, "bos_token_id", None))


def build_model(init: str, vocab: Vocabulary, dtype: torch.dtype = torch.float32, **config_overrides):
    """`init`: "tiny" (TINY_QWEN2, random weights) or a hub id / local folder of a causal LLM.

    From an LLM the embeddings are resized to `vocab.size`; every row from `vocab.num_base_text_tokens`
    on (our specials, the visual codes, and any unused padding rows of the LLM) is set to the mean
    of the text rows, for the input and (when untied) the output embeddings.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if init == "tiny":
        from simplear.tiny import TINY_QWEN2

        cfg = {**TINY_QWEN2, **_special_ids(vocab), **config_overrides, "vocab_size": vocab.size}
        return Qwen2ForCausalLM(Qwen2Config(**cfg)).to(dtype)

    model = AutoModelForCausalLM.from_pretrained(init, dtype=dtype, **config_overrides)
    if model.get_input_embeddings().weight.shape[0] != vocab.size:
        resize_embeddings(model, vocab)
    for k, v in _special_ids(vocab).items():
        setattr(model.config, k, v)
    return model


@torch.no_grad()
def resize_embeddings(model, vocab: Vocabulary) -> None:
    n = vocab.num_base_text_tokens
    old_in = model.get_input_embeddings().weight
    if old_in.shape[0] < n:
        raise ValueError(f"the model has {old_in.shape[0]} embedding rows but the text tokenizer has {n} tokens")
    old_out = model.get_output_embeddings().weight
    tied = old_out.data_ptr() == old_in.data_ptr()
    mean_in = old_in[:n].float().mean(0)
    mean_out = old_out[:n].float().mean(0)
    model.resize_token_embeddings(vocab.size, mean_resizing=False)
    new_in = model.get_input_embeddings().weight
    new_in[n:] = mean_in.to(new_in.dtype)
    if not tied:
        new_out = model.get_output_embeddings().weight
        new_out[n:] = mean_out.to(new_out.dtype)
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias[n:] = bias[:n].mean()
    model.config.vocab_size = vocab.size


@dataclass
class Checkpoint:
    model: Any  # Qwen2ForCausalLM
    vocab: Vocabulary
    visual_tokenizer_config: VisualTokenizerConfig
    extra: dict = field(default_factory=dict)
    path: Path | None = None
    sampling: SamplingSpec = field(default_factory=lambda: DEFAULT_SAMPLING)  # its recorded defaults, complete

    def load_visual_tokenizer(self, **kwargs):
        from simplear.visual_tokenizers import load_visual_tokenizer

        return load_visual_tokenizer(self.visual_tokenizer_config, **kwargs)


def save_checkpoint(directory, model, vocab: Vocabulary, visual_tokenizer_config: VisualTokenizerConfig | dict,
                    extra: dict | None = None, sampling: SamplingSpec = DEFAULT_SAMPLING) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if not isinstance(visual_tokenizer_config, VisualTokenizerConfig):
        visual_tokenizer_config = VisualTokenizerConfig.model_validate(visual_tokenizer_config)
    if visual_tokenizer_config.kind == "cosmos" and visual_tokenizer_config.sha256 is None \
            and Path(visual_tokenizer_config.path).is_dir():  # which Cosmos files the weights go with, checked on load
        from simplear.visual_tokenizers import cosmos_digest

        visual_tokenizer_config = visual_tokenizer_config.model_copy(update={"sha256": cosmos_digest(visual_tokenizer_config.path)})
    if visual_tokenizer_config.codebook_size != vocab.codebook_size:
        raise ValueError(f"visual tokenizer has {visual_tokenizer_config.codebook_size} codes, vocabulary {vocab.codebook_size}")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != vocab.size:
        raise ValueError(f"model has {rows} embedding rows, vocabulary {vocab.size} ids")
    (d / META_FILE).unlink(missing_ok=True)  # the marker goes last: a half-written folder is no checkpoint
    model.save_pretrained(str(d))
    vocab.text_tokenizer.save_pretrained(str(d))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab": vocab.metadata(),
        "visual_tokenizer": visual_tokenizer_config.model_dump(mode="json"),
        "sampling": sampling.complete().model_dump(mode="json"),
        "extra": extra or {},
    }
    _write_json_atomic(d / META_FILE, meta)
    return d


def is_checkpoint(directory) -> bool:
    p = Path(directory) / META_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def checkpoint_meta(directory, visual_tokenizer: VisualTokenizerConfig | None = None) -> dict:
    """A local checkpoint folder's `simplear.json`; for a released checkpoint as published (none there), the one
    `visual_tokenizer` implies, checked against the folder (simplear.release)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {d}")
    if is_checkpoint(d):
        return json.loads((d / META_FILE).read_text())
    if visual_tokenizer is None:
        raise ValueError(f"not a SimpleAR checkpoint: {d} (no valid {META_FILE}). A released checkpoint as published: "
                         "give its visual tokenizer (--visual-tokenizer / visual_tokenizer:), or `simplear import` it")
    from simplear.release import describe_release

    return describe_release(d, visual_tokenizer)


def load_checkpoint(directory, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    visual_tokenizer: VisualTokenizerConfig | None = None) -> Checkpoint:
    """`directory`: a folder, or a run dir URI's `<stage>/final` (fetched once per node); a released checkpoint as
    published with its `visual_tokenizer`. `dtype` None keeps the dtype the weights were saved in."""
    from transformers import AutoModelForCausalLM

    from simplear.storage.staging import local_folder

    d = local_folder(directory)
    meta = checkpoint_meta(d, visual_tokenizer)
    vocab = Vocabulary.from_pretrained(d, meta["vocab"])
    vt_config = VisualTokenizerConfig.model_validate(meta["visual_tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype if dtype is not None else "auto")
    model.to(device)
    return Checkpoint(model=model, vocab=vocab, visual_tokenizer_config=vt_config, extra=meta.get("extra", {}), path=d,
                      sampling=recorded_sampling(meta))
