"""The torch sampler: seeds, the visual range, CFG, batching of unequal prompts, KV cache, the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simplear.model import build_model, save_checkpoint
from simplear.sampler import SamplingParams, TorchSampler
from simplear.visual_tokenizers import load_visual_tokenizer
from model_support import sharp_tiny_model
from simplear.vocab import Vocabulary

GRID = (4, 4)
LONG = "a small red circle at the top left of a plain blue background"
SHORT = "green"


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary("tiny", codebook_size=64)


@pytest.fixture(scope="module")
def model(vocab):
    return sharp_tiny_model(vocab)


@pytest.fixture(scope="module")
def sampler(model, vocab):
    return TorchSampler(model, vocab, load_visual_tokenizer({"kind": "pixel-fsq", "levels": 4}))


def teacher_forced_logp(model, vocab, prompt: str, codes_N: torch.Tensor) -> torch.Tensor:
    """(N, K) log-probs over the visual ids at each image position, from one full forward."""
    prefix = vocab.prompt_ids(prompt)
    ids = torch.tensor([prefix + vocab.codes_to_ids(codes_N.tolist())])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prefix) - 1: len(prefix) - 1 + len(codes_N)]
    return F.log_softmax(logits[:, vocab.visual_offset:].float(), -1)


def test_same_seed_same_codes(sampler):
    p = SamplingParams(cfg_scale=2.0, seed=11)
    a = sampler.generate_codes([LONG], GRID, p)
    assert a.shape == (1, *GRID) and a.dtype == torch.long
    assert not a.is_inference()  # usable next to autograd tensors (GRPO)
    assert torch.equal(a, sampler.generate_codes([LONG], GRID, p))
    assert not torch.equal(a, sampler.generate_codes([LONG], GRID, SamplingParams(cfg_scale=2.0, seed=12)))
    # whatever else is in the batch, and wherever the request sits in it
    batch = sampler.generate_codes([SHORT, LONG, LONG], GRID,
                                   [SamplingParams(seed=1, top_k=3), p, SamplingParams(cfg_scale=4.0, seed=11, negative_prompt="red")])
    assert torch.equal(batch[1], a[0])
    assert not torch.equal(batch[2], a[0])  # same seed, other params: another image
    torch.manual_seed(5)
    r1 = sampler.generate_codes([LONG], GRID, SamplingParams())
    torch.manual_seed(5)
    assert torch.equal(r1, sampler.generate_codes([LONG], GRID, SamplingParams()))  # seed=None follows torch's RNG


def test_only_visual_ids_are_sampled(vocab):
    torch.manual_seed(1)
    m = build_model("tiny", vocab, num_hidden_layers=1).eval()
    with torch.no_grad():
        m.get_output_embeddings().weight[: vocab.visual_offset].mul_(1000)  # text ids dominate the full softmax
    ids = torch.tensor([vocab.prompt_ids(LONG)])
    with torch.no_grad():
        assert m(ids).logits[0, -1].argmax() < vocab.visual_offset  # unrestricted, the model would emit text
    s = TorchSampler(m, vocab)
    for p in [SamplingParams(seed=0, temperature=5.0), SamplingParams(seed=1, cfg_scale=7.0, top_p=0.99),
              SamplingParams(greedy=True), SamplingParams(seed=2, cfg_scale=-3.0, top_k=64)]:
        codes = s.generate_codes([LONG, SHORT], (6, 6), p)
        assert codes.min() >= 0 and codes.max() < vocab.codebook_size
        vocab.ids_to_codes(vocab.codes_to_ids(codes))  # all ids visual, or this raises


def _reference_plain_sampling(model, vocab, prompt, N, seed):
    """Plain conditional sampling written out: full forward each step, no cache, no CFG, same uniforms."""
    u = torch.rand(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ids = vocab.prompt_ids(prompt)
    codes, logps = [], []
    for t in range(N):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        logp = F.log_softmax(logits[vocab.visual_offset:].float(), -1)
        cdf = logp.double().exp().cumsum(0)
        c = int(torch.searchsorted(cdf, u[t] * cdf[-1], right=True).clamp(max=len(cdf) - 1))
        codes.append(c)
        logps.append(logp[c].item())
        ids.append(c + vocab.visual_offset)
    return torch.tensor(codes), torch.tensor(logps)


def test_cfg_scale_one_is_plain_conditional_sampling(sampler, model, vocab):
    N = GRID[0] * GRID[1]
    ref_codes, ref_logps = _reference_plain_sampling(model, vocab, LONG, N, seed=3)
    for neg in ["", "blue"]:  # with scale 1 the unconditional prompt plays no part
        codes, logps = sampler.generate_codes([LONG], GRID, SamplingParams(cfg_scale=1.0, seed=3, negative_prompt=neg), return_logprobs=True)
        assert torch.equal(codes.flatten(), ref_codes)
        assert torch.allclose(logps.flatten(), ref_logps, atol=1e-4)
    # and guidance really changes the result
    assert not torch.equal(sampler.generate_codes([LONG], GRID, SamplingParams(cfg_scale=5.0, seed=3)).flatten(), ref_codes)


def test_cfg_combines_log_probs(sampler, model, vocab):
    s, neg = 3.0, "black"
    codes, logps = sampler.generate_codes([LONG], GRID, SamplingParams(cfg_scale=s, seed=4, negative_prompt=neg), return_logprobs=True)
    c = teacher_forced_logp(model, vocab, LONG, codes.flatten())
    u = teacher_forced_logp(model, vocab, neg, codes.flatten())
    expected = F.log_softmax(u + s * (c - u), -1).gather(-1, codes.view(-1, 1)).squeeze(-1)
    assert torch.allclose(logps.flatten(), expected, atol=1e-4)
    # temperature scales the combined distribution
    codes_t, logps_t = sampler.generate_codes([LONG], GRID, SamplingParams(cfg_scale=s, seed=4, negative_prompt=neg, temperature=0.7), return_logprobs=True)
    c = teacher_forced_logp(model, vocab, LONG, codes_t.flatten())
    u = teacher_forced_logp(model, vocab, neg, codes_t.flatten())
    expected = F.log_softmax(F.log_softmax(u + s * (c - u), -1) / 0.7, -1).gather(-1, codes_t.view(-1, 1)).squeeze(-1)
    assert torch.allclose(logps_t.flatten(), expected, atol=1e-4)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_batch_of_unequal_prompts_equals_each_alone(sampler, cfg):
    params = [SamplingParams(cfg_scale=cfg, seed=21), SamplingParams(cfg_scale=cfg, seed=22, negative_prompt="a dark plain background")]
    both, lp_both = sampler.generate_codes([LONG, SHORT], GRID, params, return_logprobs=True)
    long_alone, lp_long = sampler.generate_codes([LONG], GRID, params[0], return_logprobs=True)
    short_alone, lp_short = sampler.generate_codes([SHORT], GRID, params[1], return_logprobs=True)
    assert torch.equal(both[0], long_alone[0]) and torch.equal(both[1], short_alone[0])
    assert torch.allclose(lp_both[0], lp_long[0], atol=1e-4) and torch.allclose(lp_both[1], lp_short[0], atol=1e-4)
    # the test can see a difference: another prompt with the same seed gives another image
    assert not torch.equal(sampler.generate_codes([SHORT], GRID, params[0])[0], long_alone[0])


def test_kv_cache_and_batched_cfg_change_nothing(model, vocab):
    prompts = [LONG, SHORT]
    params = [SamplingParams(cfg_scale=3.0, seed=1), SamplingParams(cfg_scale=1.5, seed=2, top_p=0.9)]
    ref, lp = TorchSampler(model, vocab).generate_codes(prompts, GRID, params, return_logprobs=True)
    for kw in [dict(use_kv_cache=False), dict(batch_cfg=False), dict(use_kv_cache=False, batch_cfg=False)]:
        codes, lp2 = TorchSampler(model, vocab, **kw).generate_codes(prompts, GRID, params, return_logprobs=True)
        assert torch.equal(codes, ref), kw
        assert torch.allclose(lp2, lp, atol=1e-4), kw


def test_the_step_reads_nothing_back_to_the_host(sampler, monkeypatch):
    """No decode step waits for the device: what needs a host decision is known when the batch is built, and the
    cache, mask and positions are device tensors (the old DynamicCache path failed this in transformers' mask code)."""
    params = [SamplingParams(cfg_scale=2.0, seed=1, top_k=5), SamplingParams(seed=2, temperature=0),
              SamplingParams(seed=3, top_p=0.9, cfg_scale=3.0)]
    ref = sampler.generate_codes([LONG, SHORT, SHORT], GRID, params)

    def host_read(*_args, **_kw):
        raise AssertionError("a tensor was read back to the host while sampling")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    codes = sampler.generate_codes([LONG, SHORT, SHORT], GRID, params)  # the final .cpu() copy is the only read
    monkeypatch.undo()
    assert torch.equal(codes, ref)


def test_engine_options_are_checked(model, vocab):
    with pytest.raises(ValueError, match="CUDA"):
        TorchSampler(model, vocab, capture=True)  # a CUDA graph of the step needs CUDA
    eager = build_model("tiny", vocab, num_hidden_layers=1, attn_implementation="eager")
    with pytest.raises(ValueError, match="sdpa"):
        TorchSampler(eager, vocab)
    sliding = build_model("tiny", vocab, num_hidden_layers=1, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="full-attention"):
        TorchSampler(sliding, vocab)


def test_greedy_top_k_top_p(sampler, model, vocab):
    greedy = sampler.generate_codes([LONG], GRID, SamplingParams(greedy=True, cfg_scale=2.0))
    assert torch.equal(greedy, sampler.generate_codes([LONG], GRID, SamplingParams(temperature=0, cfg_scale=2.0, seed=9)))
    assert torch.equal(greedy, sampler.generate_codes([LONG], GRID, SamplingParams(top_k=1, cfg_scale=2.0, seed=9)))
    assert torch.equal(greedy, sampler.generate_codes([LONG], GRID, SamplingParams(top_p=1e-9, cfg_scale=2.0, seed=9)))
    # top-k: every code is among the k most probable of its step
    for seed in range(3):
        codes = sampler.generate_codes([LONG], GRID, SamplingParams(top_k=3, temperature=3.0, seed=seed)).flatten()
        logp = teacher_forced_logp(model, vocab, LONG, codes)
        rank = (logp > logp.gather(-1, codes[:, None])).sum(-1)
        assert (rank < 3).all()
    # top-p: every code lies in the smallest set holding p of the mass
    codes = sampler.generate_codes([LONG], GRID, SamplingParams(top_p=0.5, temperature=3.0, seed=0)).flatten()
    probs = (teacher_forced_logp(model, vocab, LONG, codes) / 3.0).softmax(-1)
    mass_before = (probs * (probs > probs.gather(-1, codes[:, None]))).sum(-1)
    assert (mass_before < 0.5 + 1e-6).all()


def test_images_and_mode(sampler, model):
    model.train()
    imgs = sampler.generate_images([LONG, SHORT], size=32, params=SamplingParams(cfg_scale=2.0, seed=0))
    assert model.training  # restored after sampling
    model.eval()
    assert len(imgs) == 2 and all(im.size == (32, 32) and im.mode == "RGB" for im in imgs)
    wide = sampler.generate_images([SHORT], size=(16, 40), params=SamplingParams(seed=0))
    assert wide[0].size == (40, 16)
    with pytest.raises(ValueError, match="multiple"):
        sampler.generate_images([SHORT], size=20)


def test_params_validation(sampler):
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="SamplingParams"):
        sampler.generate_codes([LONG, SHORT], GRID, [SamplingParams()])


def test_cli_generate(tmp_path, model, vocab, capsys):
    from PIL import Image

    from simplear.cli import main

    save_checkpoint(tmp_path / "ckpt", model, vocab, {"kind": "pixel-fsq", "levels": 4})
    args = ["generate", LONG, "--model", str(tmp_path / "ckpt"), "--cfg", "3", "--seed", "0", "--size", "32"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()
    assert main(args + ["-o", str(tmp_path / "n.png"), "-n", "2"]) == 0
    assert (tmp_path / "n_0.png").is_file() and (tmp_path / "n_1.png").is_file()
    assert Image.open(tmp_path / "n_0.png").tobytes() == a.tobytes()  # image i uses seed + i
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampler_on_gpu(vocab):
    torch.manual_seed(0)
    m = build_model("tiny", vocab, num_hidden_layers=2, dtype=torch.bfloat16)
    s = TorchSampler(m, vocab, device="cuda")
    p = [SamplingParams(cfg_scale=3.0, seed=1), SamplingParams(cfg_scale=1.0, seed=2)]
    a = s.generate_codes([LONG, SHORT], (8, 8), p)
    assert s.capture  # the step is a replayed CUDA graph
    assert a.shape == (2, 8, 8) and a.min() >= 0 and a.max() < vocab.codebook_size
    assert torch.equal(a, s.generate_codes([LONG, SHORT], (8, 8), p))
    # the graph computes what the eager step does (fp32, so no bf16 rounding can part them)
    m32 = m.float()
    captured = TorchSampler(m32, vocab).generate_codes([LONG, SHORT], (8, 8), p, return_logprobs=True)
    eager = TorchSampler(m32, vocab, capture=False).generate_codes([LONG, SHORT], (8, 8), p, return_logprobs=True)
    assert torch.equal(captured[0], eager[0]) and torch.allclose(captured[1], eager[1], atol=1e-5)


def test_a_temperature_too_small_to_divide_by_is_refused(sampler, model, vocab):
    """1e-300 is 0 as the float32 divisor of the log-probs: NaN, and a blank image. 0 stays greedy; the smallest
    temperature allowed above it draws finite log-probs even from the flattest distribution."""
    from pydantic import ValidationError

    from simplear.sampling.draw import DrawSettings
    from simplear.sampling.spec import MIN_TEMPERATURE, SamplingSpec

    for t in (1e-300, 1e-40, MIN_TEMPERATURE / 2):
        with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least 1e-05, got"):
            SamplingParams(temperature=t)
        with pytest.raises(ValidationError, match="temperature"):  # workflow configs fail at load, naming the key
            SamplingSpec(temperature=t)
    K = vocab.codebook_size
    flat = torch.zeros(1, K)
    logp = DrawSettings.of([SamplingParams(temperature=MIN_TEMPERATURE)], K, "cpu").final_logprobs(flat)
    assert torch.isfinite(logp).all()
    greedy = sampler.generate_codes([LONG], GRID, SamplingParams(temperature=0, cfg_scale=2.0))
    assert torch.equal(greedy, sampler.generate_codes([LONG], GRID, SamplingParams(temperature=MIN_TEMPERATURE,
                                                                                    cfg_scale=2.0, seed=3)))


def test_a_serving_default_temperature_too_small_fails_where_the_config_loads():
    from pydantic import ValidationError

    from simplear.serving.config import ServeConfig

    with pytest.raises(ValidationError, match=r"sampling.temperature\n.*at least 1e-05, got 1e-09"):
        ServeConfig.model_validate({"sampling": {"temperature": 1e-9}})
    assert ServeConfig.model_validate({"sampling": {"temperature": 0}}).sampling.temperature == 0


def test_a_request_with_such_a_temperature_gets_a_400():
    """What the server answers before a request is admitted needs no engine and no Serve: the request path alone."""
    import asyncio
    import json

    from starlette.requests import Request

    from simplear.sampling.spec import DEFAULT_SAMPLING
    from simplear.serving.app import ImageServer
    from simplear.serving.auth import BearerAuth
    from simplear.serving.config import ServeConfig

    server = object.__new__(ImageServer)
    server.cfg, server.auth, server.defaults = ServeConfig(engine="torch"), BearerAuth([]), DEFAULT_SAMPLING
    body = json.dumps({"prompt": "a red circle", "temperature": 1e-300}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"application/json")]
    request = Request({"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": headers}, receive)
    response = asyncio.run(server._generation(request))
    assert response.status_code == 400
    message = json.loads(response.body)["error"]["message"]
    assert message == "temperature must be 0 (greedy) or at least 1e-05, got 1e-300"
