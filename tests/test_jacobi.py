"""Speculative Jacobi decoding: greedy SJD equals greedy plain decoding, steps fall when drafts are right, the images
of a batch roll back on their own, sampled SJD draws from the torch engine's distribution (CFG, top-k, both draft
initialisations) and from its per-request stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_support import sharp_tiny_model
from simplear.jacobi import JacobiSampler
from simplear.model import build_model
from simplear.sampler import SamplingParams, TorchSampler
from simplear.visual_tokenizers import load_visual_tokenizer
from simplear.vocab import Vocabulary


PROMPTS = ["a red circle on a blue background", "green", "a small yellow star at the top left of a plain black background"]


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary("tiny", codebook_size=64)


@pytest.fixture(scope="module")
def sampler(vocab):
    return TorchSampler(sharp_tiny_model(vocab), vocab, load_visual_tokenizer({"kind": "pixel-fsq", "levels": 4}))


@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_plain_decoding(sampler, window, cfg):
    p = SamplingParams(cfg_scale=cfg, temperature=0, negative_prompt="a white background" if cfg == 3.0 else "")
    plain = sampler.generate_codes(PROMPTS, (6, 6), p)
    sjd, stats = JacobiSampler(sampler, window=window).generate_codes(PROMPTS, (6, 6), p, return_stats=True)
    assert torch.equal(sjd, plain)
    assert len(stats.steps) == len(PROMPTS) and all(1 <= s <= 36 for s in stats.steps)


def constant_sampler(vocab, codebook_bias: int | None = None):
    """A model whose next-token distribution ignores the context: hidden state zero -> logits from the bias only.
    Jacobi iteration converges at once, so every draft after the first step is right."""
    torch.manual_seed(1)
    model = build_model("tiny", vocab, num_hidden_layers=1)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return TorchSampler(model.eval(), vocab)


@pytest.mark.parametrize("window", [3, 8])
def test_steps_fall_when_drafts_are_right(vocab, window):
    s = constant_sampler(vocab)
    N, best = 64, 1 + math.ceil((64 - 1) / (window + 1))  # prefill, then window + 1 tokens a step
    # greedy: logits all equal -> argmax is code 0 everywhere; drafts drawn from the last distribution are right
    greedy = SamplingParams(temperature=0)
    codes, stats = JacobiSampler(s, window=window).generate_codes(["a"], (8, 8), greedy, return_stats=True)
    assert (codes == 0).all() and stats.steps == [best]
    # the paper's uniform first drafts are wrong (63 in 64), then renewed right by the Jacobi step
    codes, stats = JacobiSampler(s, window=window, draft_init="uniform").generate_codes(["a"], (8, 8), greedy, return_stats=True)
    assert (codes == 0).all() and best < stats.steps[0] <= 2 * best
    # sampling: p is uniform, and so is every q, so every draft is accepted
    for init in ("last", "uniform"):
        js = JacobiSampler(s, window=window, draft_init=init)
        _, stats = js.generate_codes(["a", "b"], (8, 8), SamplingParams(seed=3), return_stats=True)
        assert stats.steps == [best] * 2
        assert stats.compression == pytest.approx(N / best)


def test_seeds_make_sjd_repeatable(sampler):
    js = JacobiSampler(sampler, window=4)
    p = SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=20, top_p=0.9, seed=9)
    a = js.generate_codes(PROMPTS, (4, 4), p)
    assert torch.equal(a, js.generate_codes(PROMPTS, (4, 4), p))
    assert torch.equal(a[1:2], js.generate_codes(PROMPTS[1:2], (4, 4), p))
    assert not torch.equal(a, js.generate_codes(PROMPTS, (4, 4), SamplingParams(cfg_scale=2.0, seed=10)))
    images = js.generate_images(PROMPTS[:1], size=32, params=p)
    assert images[0].size == (32, 32)
    # top-k 1 leaves one choice per position: the greedy codes
    assert torch.equal(js.generate_codes(PROMPTS, (4, 4), SamplingParams(cfg_scale=2.0, top_k=1, seed=1)),
                       sampler.generate_codes(PROMPTS, (4, 4), SamplingParams(cfg_scale=2.0, temperature=0)))


def test_sampled_sjd_draws_from_the_torch_engines_stream(sampler):
    """SJD's first uniform is the torch engine's uniform 0 and its draw from a target is the torch engine's, so the
    first token of every image is the torch engine's for the same seed, with top-k/top-p too. Further tokens are not:
    a draft kept with probability min(1, p/q) is not the inverse CDF of the torch engine's uniform (jacobi.py's
    docstring), so only greedy SJD (test above) equals the torch engine image for image."""
    n = 12
    params = [SamplingParams(cfg_scale=2.0, temperature=2.0, seed=s, top_k=(None, 12, None)[s % 3],
                             top_p=(None, None, 0.95)[s % 3]) for s in range(n)]
    prompts = [PROMPTS[s % 3] for s in range(n)]
    torch.manual_seed(0)
    sjd = JacobiSampler(sampler, window=3).generate_codes(prompts, (1, 4), params)
    torch.manual_seed(1)  # only the seeds matter, not torch's global RNG
    plain = sampler.generate_codes(prompts, (1, 4), params)
    assert torch.equal(sjd[:, 0, 0], plain[:, 0, 0])
    assert len(set(plain[:, 0, 0].tolist())) >= n // 2  # the first token varies with the seed


def soft_sampler(vocab, seed: int = 2) -> TorchSampler:
    """A 1-layer model whose drafts are right often but not always: the images of a batch accept different numbers."""
    torch.manual_seed(seed)
    model = build_model("tiny", vocab, num_hidden_layers=1)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
        model.get_output_embeddings().weight.mul_(3)
    return TorchSampler(model.eval(), vocab)


def test_an_image_does_not_depend_on_its_batch():
    """Images of a batch accept different numbers of drafts per step, so their rows go ragged on the shared cache and
    each rolls back on its own: each image equals itself decoded alone (without the per-row rollback 2 of these 4
    differ), and a greedy image among sampled ones equals greedy plain decoding."""
    vocab = Vocabulary("tiny", codebook_size=64)
    s = soft_sampler(vocab)
    js = JacobiSampler(s, window=4)
    params = [SamplingParams(cfg_scale=2.0, seed=i, top_k=(None, 20)[i % 2]) for i in range(4)]
    params.append(SamplingParams(cfg_scale=2.0, temperature=0))
    prompts = PROMPTS + ["blue", "a red circle"]
    batch, stats = js.generate_codes(prompts, (6, 6), params, return_stats=True)
    assert len(set(stats.steps)) > 1  # ragged
    for i in range(len(prompts)):
        assert torch.equal(batch[i], js.generate_codes(prompts[i:i + 1], (6, 6), params[i:i + 1])[0]), i
    assert torch.equal(batch[-1], s.generate_codes(prompts[-1:], (6, 6), params[-1])[0])


@pytest.mark.parametrize("draft_init", ["last", "uniform"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_sampled_sjd_draws_from_the_target_distribution(draft_init, top_k):
    """Exact marginal of the 3rd token (enumerating the first two) vs SJD's empirical one, 8 codes, window 2, CFG 2,
    with both draft initialisations and with top-k: the 3rd token's draft is verified against a q from a rejected
    prefix half the time, so acceptance and residual both count."""
    vocab = Vocabulary("tiny", codebook_size=8)
    s = soft_sampler(vocab)
    model = s.model
    p = SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=top_k)
    prompt = "red"
    rows = [vocab.prompt_ids(prompt), vocab.prompt_ids("")]
    vo, K = vocab.visual_offset, 8

    def dist(prefix_codes):
        with torch.no_grad():
            logp = [F.log_softmax(model(torch.tensor([r + [vo + c for c in prefix_codes]])).logits[0, -1, vo:vo + K], -1)
                    for r in rows]
        probs = F.softmax(logp[1] + 2.0 * (logp[0] - logp[1]), -1).double()
        if top_k is not None:
            probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, 0.0)
        return probs / probs.sum()

    p0 = dist([])
    exact = [p0, sum(p0[a] * dist([a]) for a in range(K)),
             sum(p0[a] * dist([a])[b] * dist([a, b]) for a in range(K) for b in range(K))]
    # total variation of the empirical marginals, largest of the 3 tokens: 0.013-0.034 here; 0.061-0.157 drawing the
    # replacement from p instead of the residual, 0.14-0.61 accepting every draft
    n = 2000
    torch.manual_seed(0)
    codes = JacobiSampler(s, window=2, draft_init=draft_init).generate_codes([prompt] * n, (1, 3), p)
    for i in range(3):
        emp = torch.bincount(codes[:, 0, i], minlength=K).double() / n
        assert 0.5 * (emp - exact[i]).abs().sum().item() < 0.05, (i, emp, exact[i])


def test_needs_the_kv_cache(sampler, vocab):
    with pytest.raises(ValueError, match="KV cache"):
        JacobiSampler(TorchSampler(sampler.model, vocab, use_kv_cache=False))
    with pytest.raises(ValueError, match="window"):
        JacobiSampler(sampler, window=0)


def test_serve_builds_sjd_for_the_torch_engine(tmp_path):
    from serve_support import make_checkpoint
    from simplear.serving import ServeConfig, build_engine

    ckpt = make_checkpoint(tmp_path / "ckpt", layers=1)
    engine, _ = build_engine(ckpt, ServeConfig(engine="torch", sjd_window=4, sizes=["32x32"], device="cpu"))
    assert isinstance(engine, JacobiSampler) and engine.window == 4
    images = engine.generate_images(["a red circle"], size=(32, 32), params=[SamplingParams(seed=1)])
    assert images[0].size == (32, 32)
