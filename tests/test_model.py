"""The AR transformer: the tiny preset, the embedding resize from an LLM, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from simplear.model import Checkpoint, build_model, load_checkpoint, save_checkpoint
from simplear.tiny import TINY_QWEN2, build_tiny_text_tokenizer
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.vocab import Vocabulary

PIXEL = VisualTokenizerConfig(kind="pixel-fsq", levels=4)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary("tiny", codebook_size=64)


def test_tiny_preset(vocab):
    model = build_model("tiny", vocab)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert cfg.head_dim >= 32 and cfg.hidden_size == 128  # vLLM's CPU attention needs head_dim >= 32
    assert cfg.hidden_size == cfg.num_attention_heads * cfg.head_dim
    assert cfg.vocab_size == vocab.size == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == vocab.size
    assert cfg.pad_token_id == vocab.pad_id
    assert build_model("tiny", vocab, num_hidden_layers=2).config.num_hidden_layers == 2
    assert TINY_QWEN2["num_hidden_layers"] == cfg.num_hidden_layers


def _fake_llm(path, tied: bool, extra_rows: int = 7):
    """A small 'pretrained LLM' folder: its own tokenizer, an embedding padded past it (like Qwen's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_text_tokenizer()
    cfg = Qwen2Config(**{**TINY_QWEN2, "num_hidden_layers": 1, "tie_word_embeddings": tied}, vocab_size=len(tok) + extra_rows)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.3, 1.0)  # a mean far from 0, so the test can see it
        if not tied:
            model.get_output_embeddings().weight.normal_(-0.5, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, len(tok)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_resize_init(tmp_path, tied):
    old, n_text = _fake_llm(tmp_path / "llm", tied)
    vocab = Vocabulary(str(tmp_path / "llm"), codebook_size=50)
    assert vocab.num_base_text_tokens == n_text
    model = build_model(str(tmp_path / "llm"), vocab)
    assert model.config.vocab_size == vocab.size
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        w_old, w_new = get(old).detach(), get(model).detach()
        assert w_new.shape == (vocab.size, w_old.shape[1])
        assert torch.equal(w_new[:n_text], w_old[:n_text])  # text rows keep their meaning
        mean = w_old[:n_text].mean(0)
        assert torch.allclose(w_new[n_text:], mean.expand(vocab.size - n_text, -1), atol=1e-6)  # specials + codes
    if tied:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # the rest of the network is the LLM's
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, old.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([vocab.prompt_ids("a red circle") + vocab.codes_to_ids([0, 49])])
    assert torch.isfinite(model(ids).logits).all()


def test_checkpoint_round_trip(tmp_path, vocab):
    model = build_model("tiny", vocab, num_hidden_layers=2)
    d = save_checkpoint(tmp_path / "ckpt", model, vocab, PIXEL, extra={"stage": "pretrain", "step": 7})
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    meta = json.loads((d / "simplear.json").read_text())
    assert meta["vocab"]["visual_offset"] == vocab.visual_offset
    assert meta["visual_tokenizer"]["kind"] == "pixel-fsq" and meta["extra"]["step"] == 7

    ckpt = load_checkpoint(d)
    assert isinstance(ckpt, Checkpoint) and ckpt.extra == {"stage": "pretrain", "step": 7}
    assert ckpt.vocab.metadata() == vocab.metadata()
    assert ckpt.visual_tokenizer_config == PIXEL
    assert ckpt.load_visual_tokenizer().codebook_size == vocab.codebook_size
    ids = torch.tensor([vocab.prompt_ids("a blue square") + vocab.codes_to_ids(list(range(10)))])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ckpt.model(ids).logits)
    assert next(ckpt.model.parameters()).dtype == torch.float32
    assert next(load_checkpoint(d, dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16

    # a plain HF (and so vLLM) load sees an ordinary Qwen2 model and tokenizer
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(d).architectures == ["Qwen2ForCausalLM"]
    assert len(AutoTokenizer.from_pretrained(d)) == vocab.visual_offset


def test_load_errors_name_the_path(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="no-such-ckpt"):
        load_checkpoint(tmp_path / "no-such-ckpt")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a SimpleAR checkpoint: .*plain"):
        load_checkpoint(tmp_path / "plain")


def test_save_checks_consistency(tmp_path, vocab):
    model = build_model("tiny", vocab, num_hidden_layers=1)
    with pytest.raises(ValueError, match="codes"):
        save_checkpoint(tmp_path / "c", model, vocab, {"kind": "pixel-fsq", "levels": 5})  # 125 codes, vocab has 64
    other = Vocabulary("tiny", codebook_size=125)
    with pytest.raises(ValueError, match="embedding rows"):
        save_checkpoint(tmp_path / "c", model, other, {"kind": "pixel-fsq", "levels": 5})
