"""Vocabulary: the tiny tokenizer, codes <-> ids, prompts, training batches, CFG dropout, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simplear.tiny import build_tiny_text_tokenizer
from simplear.vocab import IGNORE_INDEX, SOI, SPECIALS, T2I, Vocabulary


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary("tiny", codebook_size=1000)


def test_tiny_tokenizer_is_deterministic_and_saveable(tmp_path):
    a, b = build_tiny_text_tokenizer(), build_tiny_text_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.pad_token and a.eos_token and a.unk_token
    text = "a red circle on a blue background, 42 shapes"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learnt: whole words are single tokens
    a.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    c = AutoTokenizer.from_pretrained(tmp_path)
    assert c(text, add_special_tokens=False)["input_ids"] == ids


def test_layout_and_specials(vocab):
    tok = vocab.text_tokenizer
    assert vocab.visual_offset == len(tok)  # offset counts the specials
    # the reference code's seven, in its order, right after the base tokenizer's tokens
    first = vocab.num_base_text_tokens
    assert tok.convert_ids_to_tokens(list(range(first, vocab.visual_offset))) == [
        "<|t2i|>", "<|i2t|>", "<|soi|>", "<|vtokens|>", "<|t2v|>", "<|v2t|>", "<|sov|>"] == list(SPECIALS)
    assert (vocab.t2i_id, vocab.soi_id) == (first, first + 2)
    assert vocab.size == len(tok) + 1000
    assert tok.convert_ids_to_tokens([vocab.t2i_id, vocab.soi_id]) == [T2I, SOI]
    assert vocab.t2i_id < vocab.visual_offset and vocab.soi_id < vocab.visual_offset
    assert vocab.pad_id == tok.pad_token_id
    # the specials are never split, even inside text
    assert tok(f"{T2I}red{SOI}", add_special_tokens=False)["input_ids"][0] == vocab.t2i_id


def test_prompt_ids(vocab):
    ids = vocab.prompt_ids("a red circle")
    assert ids[0] == vocab.t2i_id and ids[-1] == vocab.soi_id
    assert vocab.text_tokenizer.decode(ids[1:-1]) == "a red circle"
    assert vocab.prompt_ids("") == [vocab.t2i_id, vocab.soi_id]
    assert len(vocab.prompt_ids("a red circle on a blue background", max_text_tokens=2)) == 4


def test_codes_ids_round_trip(vocab):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1000, size=300)
    codes[:2] = [0, 999]
    ids = vocab.codes_to_ids(codes)
    assert isinstance(ids, np.ndarray) and ids.min() >= vocab.visual_offset and ids.max() == vocab.size - 1
    np.testing.assert_array_equal(vocab.ids_to_codes(ids), codes)
    t = torch.from_numpy(codes).view(15, 20)
    assert torch.equal(vocab.ids_to_codes(vocab.codes_to_ids(t)), t)
    assert vocab.ids_to_codes(vocab.codes_to_ids([0, 5, 999])) == [0, 5, 999]
    np.testing.assert_array_equal(vocab.ids_to_codes(vocab.codes_to_ids(codes.astype(np.int32))), codes)


def test_out_of_range_is_an_error(vocab):
    with pytest.raises(ValueError):
        vocab.codes_to_ids([1000])
    with pytest.raises(ValueError):
        vocab.codes_to_ids(torch.tensor([-1]))
    with pytest.raises(ValueError):
        vocab.ids_to_codes([vocab.soi_id])  # a text id is not a code
    with pytest.raises(ValueError):
        vocab.ids_to_codes(np.array([vocab.size]))


def test_build_batch_labels_and_masks(vocab):
    captions = ["a red circle on a blue background", "green"]
    codes = [np.arange(16, dtype=np.int32), np.arange(100, 104, dtype=np.int32)]  # two resolutions
    batch = vocab.build_batch(captions, codes, cfg_dropout=0.0)
    ids, mask, labels, pos = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    n0 = len(vocab.prompt_ids(captions[0])) + 16
    n1 = len(vocab.prompt_ids(captions[1])) + 4
    assert ids.shape == mask.shape == labels.shape == (2, max(n0, n1))
    assert mask[0].sum() == n0 and mask[1].sum() == n1
    assert (mask[1, :n1] == 1).all() and (mask[1, n1:] == 0).all()  # right padding
    assert (ids[1, n1:] == vocab.pad_id).all() and (labels[1, n1:] == IGNORE_INDEX).all()
    assert torch.equal(labels[mask.bool()], ids[mask.bool()])  # every real token is a target, like the reference
    assert ids[0].tolist()[:n0] == vocab.prompt_ids(captions[0]) + vocab.codes_to_ids(list(range(16)))
    assert torch.equal(pos[1, :n1], torch.arange(n1))

    img = vocab.build_batch(captions, codes, cfg_dropout=0.0, image_loss_only=True)["labels"]
    np0 = len(vocab.prompt_ids(captions[0]))
    assert (img[0, :np0] == IGNORE_INDEX).all()
    assert torch.equal(img[0, np0:n0], ids[0, np0:n0])
    assert torch.equal(vocab.is_visual(img[0]), img[0] != IGNORE_INDEX)


def test_batch_trains_a_model_loss(vocab):
    from simplear.model import build_model

    model = build_model("tiny", vocab, num_hidden_layers=1)
    batch = vocab.build_batch(["a red circle", "blue"], [np.arange(8), np.arange(4)], cfg_dropout=0.0)
    out = model(**batch)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - np.log(vocab.size)) < 1.0


def test_cfg_dropout_rate(vocab):
    n = 4000
    captions = ["a red circle"] * n
    codes = [np.zeros(1, dtype=np.int64)] * n
    batch = vocab.build_batch(captions, codes, cfg_dropout=0.1, rng=np.random.default_rng(0))
    dropped = (batch["input_ids"][:, 1] == vocab.soi_id)  # <|t2i|> <|soi|>: the caption became empty
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 0.015  # 3 binomial standard deviations
    assert (batch["attention_mask"][dropped].sum(1) == 3).all()
    assert not (vocab.build_batch(captions[:500], codes[:500], cfg_dropout=0.0)["input_ids"][:, 1] == vocab.soi_id).any()
    assert (vocab.build_batch(captions[:500], codes[:500], cfg_dropout=1.0)["input_ids"][:, 1] == vocab.soi_id).all()
    # seeded: the same rows drop, with a numpy seed or a torch generator
    again = vocab.build_batch(captions, codes, cfg_dropout=0.1, rng=np.random.default_rng(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])
    g1 = vocab.build_batch(captions, codes, 0.1, generator=torch.Generator().manual_seed(3))
    g2 = vocab.build_batch(captions, codes, 0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1["input_ids"], g2["input_ids"])
    with pytest.raises(ValueError):
        vocab.build_batch(captions[:2], codes[:2], cfg_dropout=1.5)


def test_save_and_load(vocab, tmp_path):
    vocab.save_pretrained(tmp_path / "v")
    again = Vocabulary.from_pretrained(tmp_path / "v")
    assert again.metadata() == vocab.metadata()
    assert again.prompt_ids("a red circle") == vocab.prompt_ids("a red circle")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Vocabulary.from_pretrained(tmp_path / "nothing-here")


def test_from_a_local_tokenizer_folder(tmp_path):
    build_tiny_text_tokenizer().save_pretrained(tmp_path / "tok")
    v = Vocabulary(str(tmp_path / "tok"), codebook_size=64)
    assert v.visual_offset == len(build_tiny_text_tokenizer()) + 7
    assert v.num_base_text_tokens == v.visual_offset - 7


def test_a_checkpoint_of_the_two_specials_layout_keeps_its_own(tmp_path):
    """Checkpoints saved before the reference layout added only `<|t2i|>` and `<|soi|>`: loaded as saved, never
    re-laid (their embedding rows follow that layout); a saved tokenizer without the specials is refused."""
    import json

    old = build_tiny_text_tokenizer()
    old.add_tokens([T2I, SOI], special_tokens=True)
    old.save_pretrained(tmp_path / "old")
    meta = {"text_tokenizer": "tiny", "num_base_text_tokens": len(old) - 2, "visual_offset": len(old), "codebook_size": 64,
            "size": len(old) + 64, "t2i_id": len(old) - 2, "soi_id": len(old) - 1, "pad_id": old.pad_token_id}
    (tmp_path / "old" / "simplear.json").write_text(json.dumps({"vocab": meta}))
    v = Vocabulary.from_pretrained(tmp_path / "old")
    assert (v.visual_offset, v.t2i_id, v.soi_id) == (len(old), len(old) - 2, len(old) - 1)
    build_tiny_text_tokenizer().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="lacks"):
        Vocabulary(str(tmp_path / "plain"), codebook_size=64, add_specials=False)
