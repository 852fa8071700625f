"""The torch engine's GPU step, rehearsed on CPU: grouped-query attention kept grouped (no per-head copy of the
cache), and the captured path's recordings per length bucket, attending only to the bucket of the slots in use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as hf_sdpa

from model_support import EagerRecorder, sharp_tiny_model
from simplear.jacobi import JacobiSampler
from simplear.model import build_model
from simplear.sampler import SamplingParams, TorchSampler
from simplear.sampling.rows import GROUPED_SDPA, grouped_sdpa
from simplear.vocab import Vocabulary

LONG = "a small red circle at the top left of a plain blue background"
SHORT = "green"
PARAMS = [SamplingParams(cfg_scale=3.0, seed=1), SamplingParams(cfg_scale=1.5, seed=2, top_p=0.9),
          SamplingParams(seed=3, temperature=0)]


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary("tiny", codebook_size=64)


@pytest.fixture(scope="module")
def model(vocab):
    return sharp_tiny_model(vocab)


@pytest.fixture
def spans(monkeypatch):
    """The key/value length of every attention call, whichever path makes it."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("T", [1, 5])
def test_grouped_attention_is_the_repeated_one(T):
    """Folding each key/value head's query heads into its query length attends as repeating its keys and values does,
    for one token and for a window whose tokens see different slots."""
    torch.manual_seed(0)
    R, H, Hk, S, D = 3, 8, 2, 40, 16
    module = type("Attention", (), {"num_key_value_groups": H // Hk, "training": False})()
    q, k, v = torch.randn(R, H, T, D), torch.randn(R, Hk, S, D), torch.randn(R, Hk, S, D)
    mask = torch.rand(R, 1, T, S) > 0.3
    mask[..., 0] = True
    folded, _ = grouped_sdpa(module, q, k, v, mask, scaling=D ** -0.5)
    repeated = F.scaled_dot_product_attention(q, hf_sdpa.repeat_kv(k, H // Hk), hf_sdpa.repeat_kv(v, H // Hk),
                                              attn_mask=mask, scale=D ** -0.5).transpose(1, 2)
    assert folded.shape == (R, T, H, D)
    assert torch.allclose(folded, repeated, atol=1e-6)


def test_no_step_copies_the_cache_per_query_head(model, vocab, monkeypatch):
    """transformers' SDPA path repeats every key and value per query head under a mask (each step, each layer); the
    engines' steps never do, and the model goes back to its own attention and training mode after, even after a
    failure."""
    ref = TorchSampler(model, vocab).generate_codes([LONG, SHORT, SHORT], (4, 4), PARAMS)
    sjd = JacobiSampler(TorchSampler(model, vocab), window=4).generate_codes([LONG, SHORT, SHORT], (4, 4), PARAMS)
    copies = []
    repeat = hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda x, n: copies.append(x.shape[-2]) or repeat(x, n))
    with torch.no_grad():  # the spy sees transformers' copies: a masked forward makes them
        model(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones((1, 1, 3, 3), dtype=torch.bool))
    assert len(copies) == 2 * model.config.num_hidden_layers
    copies.clear()
    codes = TorchSampler(model, vocab).generate_codes([LONG, SHORT, SHORT], (4, 4), PARAMS)
    jacobi = JacobiSampler(TorchSampler(model, vocab), window=4).generate_codes([LONG, SHORT, SHORT], (4, 4), PARAMS)
    assert copies == []
    assert torch.equal(codes, ref) and torch.equal(jacobi, sjd)

    model.train()
    with pytest.raises(ValueError):
        TorchSampler(model, vocab).generate_codes([LONG], (4, 4), [SamplingParams(temperature=-1.0)])
    assert model.training and model.config._attn_implementation == "sdpa"
    model.eval()
    TorchSampler(model, vocab).generate_codes([LONG], (4, 4), PARAMS[0])
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert GROUPED_SDPA != "sdpa"


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_recorded_steps_attend_to_their_length_bucket(model, vocab, spans, batch_cfg):
    """The captured path with the eager recorder: one recording per bucket of 16 slots still ahead after the prompts,
    each decode step replaying its bucket's with a span of the bucket's end (never the whole cache), and codes and
    log-probs equal to the uncaptured engine's, whose steps attend exactly to the slots in use."""
    grid, prompts = (6, 6), [LONG, SHORT, SHORT]
    N, layers = 36, model.config.num_hidden_layers
    cond, uncond = (max(len(vocab.prompt_ids(p)) for p in group) for group in ((LONG, SHORT), ("",)))
    prompt_lens = [max(cond, uncond)] if batch_cfg else [cond, uncond]  # each stream's prompt slots
    per_step = layers * len(prompt_lens)
    plain = TorchSampler(model, vocab, batch_cfg=batch_cfg)
    ref = plain.generate_codes(prompts, grid, PARAMS, return_logprobs=True)
    L = prompt_lens[0]
    assert spans[per_step::per_step] == list(range(L + 1, L + N))  # step t attends to the slots up to its own

    spans.clear()
    recorder = EagerRecorder(bucket=16)
    captured = TorchSampler(model, vocab, batch_cfg=batch_cfg, recorder=recorder)
    assert captured.capture
    codes, logps = captured.generate_codes(prompts, grid, PARAMS, return_logprobs=True)
    assert torch.equal(codes, ref[0])
    assert torch.allclose(logps, ref[1], atol=1e-5)
    bucket = lambda end, S: min(-(-end // 16) * 16, S)  # noqa: E731
    buckets = [sorted({bucket(end, P + N) for end in range(P + 1, P + N + 1)}) for P in prompt_lens]
    assert recorder.recorded == sum(buckets, [])
    assert len(buckets[0]) >= 3  # several buckets, the last one cut at the cache's end
    steps = spans[layers * (len(prompt_lens) + len(recorder.recorded)):]  # after the prefills and the warm-ups
    S = L + N
    assert steps[::per_step] == [bucket(L + t + 1, S) for t in range(N - 1)]
    assert max(steps) == S and min(steps) < S


def test_bf16_weights_draw_in_float32(vocab):
    """`dtype: auto` loads bf16 on a GPU: the engine draws from float32 log-probs over bf16 logits, in range."""
    torch.manual_seed(0)
    m = build_model("tiny", vocab, num_hidden_layers=2, dtype=torch.bfloat16)
    codes, logps = TorchSampler(m, vocab).generate_codes([LONG, SHORT], (4, 4), PARAMS[:2], return_logprobs=True)
    assert codes.min() >= 0 and codes.max() < vocab.codebook_size
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all() and (logps <= 0).all()
