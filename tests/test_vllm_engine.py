"""The vLLM engine: the CFG logits processor on its own, then one vLLM (in a Ray actor, started once)
against the torch engine on the same checkpoint: greedy codes identical with and without CFG."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from serve_support import make_checkpoint
from simplear.sampler import SamplingParams, TorchSampler
from simplear.vllm_engine import EXTRA_KEY, CFGLogitsProcessor

pytest.importorskip("vllm")

LO, HI, V = 10, 18, 20  # visual ids [10, 18) in a 20-id vocabulary


def vparams(pair=None, role=None, scale=1.0, lo=LO, hi=HI):
    from vllm import SamplingParams as VParams

    spec = {"visual": [lo, hi]}
    if pair is not None:
        spec.update(pair=pair, role=role, scale=scale)
    return VParams(max_tokens=4, extra_args={EXTRA_KEY: spec})


def update(size, added=(), removed=(), moved=()):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, added=list(added), removed=list(removed), moved=list(moved))


def expected_cfg(c, u, s):
    lc, lu = F.log_softmax(c[LO:HI], -1), F.log_softmax(u[LO:HI], -1)
    return F.log_softmax(lu + s * (lc - lu), -1)


def test_processor_pairs_rows_and_masks_non_visual_ids():
    proc = CFGLogitsProcessor()
    out_c, out_u, out_x = [], [], []
    # batch: 0 = uncond of pair a, 1 = unrelated request (no spec), 2 = plain visual-only, 3 = cond of pair a
    proc.update_state(update(4, added=[
        (0, vparams("a", "uncond", 3.0), [1], out_u),
        (1, _plain(), [1], []),
        (2, vparams(), [1], out_x),
        (3, vparams("a", "cond", 3.0), [1], out_c),
    ]))
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    before = logits.clone()
    got = proc.apply(logits.clone())
    want = expected_cfg(before[3], before[0], 3.0)
    assert torch.allclose(got[3, LO:HI], want, atol=1e-5) and torch.equal(got[0], got[3])  # both rows: the combination
    assert torch.allclose(got[2, LO:HI], F.log_softmax(before[2, LO:HI], -1), atol=1e-6)  # visual-only, no CFG
    for r in (0, 2, 3):
        assert torch.isinf(got[r, :LO]).all() and torch.isinf(got[r, HI:]).all() and (got[r, :LO] < 0).all()
        assert torch.isfinite(got[r, LO:HI]).all()
    assert torch.equal(got[1], before[1])  # a request without our extra_args is left alone
    assert proc.out_of_step == 0
    # vLLM's allowed_token_ids would have put -inf there first: still no NaN
    masked = before.clone()
    masked[:, :LO] = float("-inf")
    assert not torch.isnan(proc.apply(masked)).any()


def _plain():
    from vllm import SamplingParams as VParams

    return VParams(max_tokens=4)


def test_processor_follows_moves_swaps_and_removals():
    from vllm.v1.sample.logits_processor import MoveDirectionality

    proc = CFGLogitsProcessor()
    oc, ou, ob = [], [], []
    proc.update_state(update(3, added=[(0, vparams("a", "cond", 2.0), [1], oc), (1, vparams(), [1], ob),
                                       (2, vparams("a", "uncond", 2.0), [1], ou)]))
    proc.update_state(update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))  # cond now at 2, uncond at 0
    logits = torch.randn(3, V)
    got = proc.apply(logits.clone())
    assert torch.allclose(got[2, LO:HI], expected_cfg(logits[2], logits[0], 2.0), atol=1e-5)
    proc.update_state(update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))  # condense
    logits = torch.randn(2, V)
    got = proc.apply(logits.clone())
    assert torch.allclose(got[1, LO:HI], expected_cfg(logits[1], logits[0], 2.0), atol=1e-5) and torch.equal(got[0], got[1])
    assert proc.out_of_step == 0
    # a pair whose rows are at different lengths, or whose partner is gone, is counted as out of step
    oc.append(12)
    proc.apply(torch.randn(2, V))
    assert proc.out_of_step == 1
    proc.update_state(update(1, removed=[0]))
    proc.apply(torch.randn(2, V))
    assert proc.out_of_step == 2


@pytest.mark.parametrize("spec, message", [
    ({"visual": [5]}, "visual"),
    ({"visual": [8, 3]}, "visual"),
    ({"visual": [0, 4], "pair": "x", "role": "both"}, "role"),
    ("nope", "must be a dict"),
])
def test_processor_rejects_bad_extra_args(spec, message):
    from vllm import SamplingParams as VParams

    with pytest.raises(ValueError, match=message):
        CFGLogitsProcessor.validate_params(VParams(extra_args={EXTRA_KEY: spec}))


# -- one vLLM engine against the torch engine -------------------------------------------------------

GRID = (8, 8)  # 64 tokens
PROMPTS = ["a red circle on a blue background", "green", "a small yellow star at the top left of a plain black background", ""]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("vllm") / "ckpt")


@pytest.fixture(scope="module")
def torch_sampler(checkpoint):
    from simplear.model import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    return TorchSampler(ckpt.model, ckpt.vocab)


@pytest.fixture(scope="module")
def vllm_engine(ray_head, checkpoint):
    """VLLMSampler in a Ray actor: vLLM binds threads and patches torch in its process, which must not be pytest's."""
    import ray

    from conftest import attach_ray
    from simplear.vllm_engine import VLLMSampler

    attach_ray(ray_head)
    options = {"max_num_seqs": 4, "kv_cache_gib": 0.25}
    actor = ray.remote(num_cpus=0)(VLLMSampler).remote(str(checkpoint), None, options, 64, 64)

    def call(method, *args):
        return ray.get(getattr(actor, method).remote(*args), timeout=600)

    yield call
    ray.kill(actor)


def test_greedy_codes_equal_torch_without_cfg(vllm_engine, torch_sampler):
    p = SamplingParams(cfg_scale=1.0, temperature=0)
    got = vllm_engine("generate_codes", PROMPTS, GRID, p)
    want = torch_sampler.generate_codes(PROMPTS, GRID, p)
    assert got.shape == (len(PROMPTS), *GRID)
    assert torch.equal(got, want)


def test_greedy_codes_equal_torch_with_cfg(vllm_engine, torch_sampler):
    """Six rows of guided images plus two plain ones in one call: more rows than max_num_seqs=4, so the engine
    splits the call into chunks that keep each CFG pair together."""
    params = [SamplingParams(cfg_scale=3.0, temperature=0), SamplingParams(cfg_scale=1.0, temperature=0),
              SamplingParams(cfg_scale=1.5, temperature=0, negative_prompt="a green square"),
              SamplingParams(cfg_scale=3.0, temperature=0, greedy=True)]
    got = vllm_engine("generate_codes", PROMPTS, GRID, params)
    want = torch_sampler.generate_codes(PROMPTS, GRID, params)
    assert torch.equal(got, want)
    plain = torch_sampler.generate_codes(PROMPTS[:1], GRID, SamplingParams(cfg_scale=1.0, temperature=0))
    assert not torch.equal(want[:1], plain)  # guidance did change the picks: the comparison above means something


def test_seeded_sampling_is_repeatable_and_independent_of_the_batch(vllm_engine):
    p = SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=16, top_p=0.9, seed=123)
    together = vllm_engine("generate_codes", PROMPTS, GRID, p)
    alone = vllm_engine("generate_codes", PROMPTS[2:3], GRID, p)
    assert torch.equal(together[2:3], alone)
    assert together.min() >= 0 and together.max() < 64
    other = vllm_engine("generate_codes", PROMPTS[2:3], GRID, SamplingParams(cfg_scale=2.0, temperature=1.0, seed=124))
    assert not torch.equal(other, alone)


def test_engine_rejects_grids_it_was_not_built_for(vllm_engine):
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="at most 64"):
        vllm_engine("generate_codes", ["a"], (16, 16), SamplingParams())


def test_chunks_respect_the_step_limits():
    """Admission by chunks: rows, prompt tokens and KV blocks of a chunk all fit one vLLM step."""
    from simplear.vllm_engine import VLLMOptions, VLLMSampler, _Job

    eng = VLLMSampler.__new__(VLLMSampler)
    eng.options = VLLMOptions(max_num_seqs=4)
    eng.max_batched_tokens, eng.block_size, eng.num_blocks = 40, 16, 12
    jobs = [_Job(i, [([0] * 10, None), ([0] * 2, None)] if i % 2 else [([0] * 10, None)]) for i in range(7)]
    chunks = eng._chunks(jobs, N=20)
    assert [j.index for c in chunks for j in c] == list(range(7))
    for c in chunks:
        rows = [r for j in c for r in j.rows]
        assert len(rows) <= 4 and sum(len(ids) for ids, _ in rows) <= 40
        assert sum(math.ceil((len(ids) + 20) / 16) for ids, _ in rows) <= 12
    with pytest.raises(ValueError, match="KV blocks"):
        eng._chunks([_Job(0, [([0] * 10, None)])], N=1000)
