"""The joint vocabulary: a text tokenizer + the SimpleAR reference code's seven specials + the visual codes, and
training sequences.

Sequence (the reference code's): `<|t2i|>` caption `<|soi|>` visual tokens, visual token id = code +
len(text tokenizer including the specials): 151,672 with Qwen2.5's tokenizer, 215,672 rows with 64,000 codes,
so a checkpoint built here loads in the reference code and a released one continues here without a resize.
There is no end-of-image token: the grid size fixes the number of visual tokens. A checkpoint saved before this
layout (only `<|t2i|>` and `<|soi|>` added) keeps its own: a saved tokenizer is loaded as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

T2I = "<|t2i|>"
SOI = "<|soi|>"
# the reference code adds these after the base tokenizer, in this order (only the first and third are used)
SPECIALS = (T2I, "<|i2t|>", SOI, "<|vtokens|>", "<|t2v|>", "<|v2t|>", "<|sov|>")
META_FILE = "simplear.json"
IGNORE_INDEX = -100
# caption tokens a model sees, the same in training, GRPO and serving (recaption writes long captions of up
# to 256 tokens; longer captions are cut); a stage's `max_text_tokens` overrides it
MAX_TEXT_TOKENS = 256


def load_text_tokenizer(source):
    """A tokenizer object as is; "tiny" -> the built-in BPE; else a hub id or a local folder."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if str(source) == "tiny":
        from simplear.tiny import build_tiny_text_tokenizer

        return build_tiny_text_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def _uniforms(n: int, rng) -> np.ndarray:
    if isinstance(rng, torch.Generator):
        return torch.rand(n, generator=rng, dtype=torch.float64).numpy()
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)  # None -> fresh entropy, int -> seeded
    return rng.random(n)


class Vocabulary:
    """Text ids [0, visual_offset), then `codebook_size` visual ids [visual_offset, size)."""

    def __init__(self, text_tokenizer: Any = "tiny", codebook_size: int = 64_000, add_specials: bool = True):
        """`add_specials`: append the reference code's specials the tokenizer lacks (a base LLM's tokenizer);
        False for a saved one, whose layout is the checkpoint's (it must hold `<|t2i|>` and `<|soi|>`)."""
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.text_tokenizer_source = text_tokenizer if isinstance(text_tokenizer, (str, os.PathLike)) else getattr(text_tokenizer, "name_or_path", "")
        self.text_tokenizer_source = str(self.text_tokenizer_source)
        tok = load_text_tokenizer(text_tokenizer)
        self.num_base_text_tokens = len(tok)  # before our specials: the rows of the LLM that keep their meaning
        if add_specials:
            tok.add_tokens(list(SPECIALS), special_tokens=True)  # no-op for those the tokenizer already has
        self.text_tokenizer = tok
        vocab = tok.get_vocab()
        missing = [t for t in (T2I, SOI) if t not in vocab]
        if missing:
            raise ValueError(f"the text tokenizer {self.text_tokenizer_source!r} lacks {missing}: not a SimpleAR tokenizer")
        self.t2i_id = vocab[T2I]
        self.soi_id = vocab[SOI]
        self.num_base_text_tokens = min(self.num_base_text_tokens, self.t2i_id, self.soi_id)
        self.codebook_size = int(codebook_size)
        self.visual_offset = len(tok)
        self.size = self.visual_offset + self.codebook_size
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the text tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = int(pad)

    def __repr__(self) -> str:
        return (f"Vocabulary(text={self.text_tokenizer_source!r}, text_ids={self.visual_offset}, "
                f"codebook={self.codebook_size}, size={self.size})")

    # -- codes <-> ids -------------------------------------------------------------------------

    def codes_to_ids(self, codes):
        """Visual codes -> token ids; same container type back (list, numpy array, torch tensor)."""
        if isinstance(codes, torch.Tensor):
            if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
                raise ValueError(f"visual codes out of range [0, {self.codebook_size})")
            return codes.long() + self.visual_offset
        arr = np.asarray(codes, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise ValueError(f"visual codes out of range [0, {self.codebook_size})")
        out = arr + self.visual_offset
        return out.tolist() if isinstance(codes, (list, tuple)) else out

    def ids_to_codes(self, ids):
        """Token ids -> visual codes; a non-visual id is an error."""
        if isinstance(ids, torch.Tensor):
            if ids.numel() and (ids.min() < self.visual_offset or ids.max() >= self.size):
                raise ValueError(f"ids outside the visual range [{self.visual_offset}, {self.size})")
            return ids.long() - self.visual_offset
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < self.visual_offset or arr.max() >= self.size):
            raise ValueError(f"ids outside the visual range [{self.visual_offset}, {self.size})")
        out = arr - self.visual_offset
        return out.tolist() if isinstance(ids, (list, tuple)) else out

    def is_visual(self, ids):
        return (ids >= self.visual_offset) & (ids < self.size)

    # -- sequences -----------------------------------------------------------------------------

    def prompt_ids(self, caption: str, max_text_tokens: int | None = None) -> list[int]:
        """`<|t2i|>` caption `<|soi|>`: the prefix the model continues with visual tokens."""
        text = self.text_tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else []
        if max_text_tokens is not None:
            text = text[:max_text_tokens]
        return [self.t2i_id, *text, self.soi_id]

    def build_batch(
        self,
        captions: Sequence[str],
        codes: Sequence,
        cfg_dropout: float = 0.1,
        image_loss_only: bool = False,
        rng=None,
        max_text_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Right-padded training batch: input_ids, attention_mask, position_ids, labels.

        Labels are aligned with input_ids (the HF model shifts them) and are -100 on padding, and
        on every text token (specials included) when `image_loss_only`. With probability
        `cfg_dropout` a caption becomes empty, which teaches the unconditional model for CFG.
        `rng`: a numpy Generator, a torch Generator, a seed, or None (fresh entropy).
        """
        if len(captions) != len(codes):
            raise ValueError(f"{len(captions)} captions but {len(codes)} code arrays")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        drop = _uniforms(len(captions), generator if generator is not None else rng) < cfg_dropout
        rows, n_text = [], []
        for caption, c, dropped in zip(captions, codes, drop):
            prompt = self.prompt_ids("" if dropped else caption, max_text_tokens)
            visual = self.codes_to_ids(np.asarray(c).reshape(-1))
            rows.append(np.concatenate([np.asarray(prompt, dtype=np.int64), visual]))
            n_text.append(len(prompt))
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        for i, (r, nt) in enumerate(zip(rows, n_text)):
            t = torch.from_numpy(r)
            input_ids[i, : len(r)] = t
            attention_mask[i, : len(r)] = 1
            labels[i, : len(r)] = t
            if image_loss_only:
                labels[i, :nt] = IGNORE_INDEX
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}

    # -- persistence ---------------------------------------------------------------------------

    def metadata(self) -> dict:
        return {
            "text_tokenizer": self.text_tokenizer_source,
            "num_base_text_tokens": self.num_base_text_tokens,
            "visual_offset": self.visual_offset,
            "codebook_size": self.codebook_size,
            "size": self.size,
            "t2i_id": self.t2i_id,
            "soi_id": self.soi_id,
            "pad_id": self.pad_id,
            "t2i": T2I,
            "soi": SOI,
        }

    def save_pretrained(self, directory) -> None:
        """The text tokenizer (with the specials) + `simplear.json`'s "vocab" entry (other entries kept)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.text_tokenizer.save_pretrained(str(d))
        meta_path = d / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        meta["vocab"] = self.metadata()
        _write_json_atomic(meta_path, meta)

    @classmethod
    def from_pretrained(cls, directory, meta: dict | None = None) -> Vocabulary:
        """The saved tokenizer with `simplear.json`'s "vocab" entry, or `meta` (a release's, described here)."""
        d = Path(directory)
        meta_path = d / META_FILE
        if meta is None:
            if not meta_path.is_file():
                raise FileNotFoundError(f"{d} holds no SimpleAR vocabulary (no {META_FILE})")
            meta = json.loads(meta_path.read_text()).get("vocab")
            if not meta:
                raise ValueError(f"{meta_path} has no 'vocab' entry")
        vocab = cls(str(d), codebook_size=meta["codebook_size"], add_specials=False)
        vocab.text_tokenizer_source = meta.get("text_tokenizer", str(d))
        vocab.num_base_text_tokens = meta.get("num_base_text_tokens", vocab.num_base_text_tokens)
        for key in ("visual_offset", "t2i_id", "soi_id", "size"):
            if getattr(vocab, key) != meta[key]:
                raise ValueError(f"{meta_path}: {key} is {meta[key]} but the saved tokenizer gives {getattr(vocab, key)}")
        return vocab


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
