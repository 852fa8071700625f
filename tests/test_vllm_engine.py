"""The vLLM engine: the CFG logits processor on its own (both runner interfaces), then one vLLM (in a Ray actor,
started once) against the torch engine on the same checkpoint: the same codes, greedy and seeded, with and
without CFG. That checkpoint is a release as published (the release format `simplear export` writes, its
tokenizer as slow-tokenizer files only, as the RL releases ship it), read with the visual tokenizer it is given."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve_support import make_checkpoint
from simplear.sampler import SamplingParams, TorchSampler
from simplear.vllm_cfg import EXTRA_KEY, CFGLogitsProcessor, request_spec

pytest.importorskip("vllm")

LO, HI, V, STOP = 10, 18, 20, 3  # visual ids [10, 18) in a 20-id vocabulary; id 3 marks a parted pair


def vparams(p: SamplingParams, pair=None, role=None, max_tokens=4):
    from vllm import SamplingParams as VParams

    return VParams(max_tokens=max_tokens, extra_args={EXTRA_KEY: request_spec(LO, HI, STOP, p, p.seed, pair, role)})


def _plain():
    from vllm import SamplingParams as VParams

    return VParams(max_tokens=4)


def update(size, added=(), removed=(), moved=()):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, added=list(added), removed=list(removed), moved=list(moved))


def expected_token(p: SamplingParams, t: int, c: torch.Tensor, u: torch.Tensor | None = None) -> int:
    """The torch engine's draw written out: CFG over the visual ids, temperature, then the inverse CDF of uniform t
    of the seed's stream (float64 uniforms of a CPU generator seeded with the seed)."""
    logp = F.log_softmax(c[LO:HI], -1)
    if u is not None:
        lu = F.log_softmax(u[LO:HI], -1)
        logp = F.log_softmax(lu + p.cfg_scale * (logp - lu), -1)
    cdf = F.softmax(logp / p.temperature, -1).double().cumsum(0)
    uniform = torch.rand(t + 1, generator=torch.Generator().manual_seed(p.seed), dtype=torch.float64)[t]
    return LO + int(torch.searchsorted(cdf, uniform * cdf[-1], right=True).clamp(max=HI - LO - 1))


def assert_one_hot(row: torch.Tensor, token: int):
    assert row[token] == 0 and torch.isinf(row).sum() == V - 1 and (row[torch.arange(V) != token] < 0).all()


CFG_P = SamplingParams(cfg_scale=3.0, temperature=1.3, seed=7)
PLAIN_P = SamplingParams(seed=8)


def test_processor_draws_the_torch_engines_token_into_both_rows():
    proc = CFGLogitsProcessor()
    out_c, out_u, out_x = [], [], []
    # batch: 0 = uncond of pair a, 1 = unrelated request (no spec), 2 = plain (no CFG), 3 = cond of pair a
    proc.update_state(update(4, added=[
        (0, vparams(CFG_P, "a", "uncond"), [1], out_u),
        (1, _plain(), [1], []),
        (2, vparams(PLAIN_P), [1], out_x),
        (3, vparams(CFG_P, "a", "cond"), [1], out_c),
    ]))
    torch.manual_seed(0)
    drawn = set()
    for t in range(3):  # token t takes uniform t: the token index is the length of vLLM's output list
        logits = torch.randn(4, V)
        got = proc.apply(logits.clone())
        tok = expected_token(CFG_P, t, logits[3], logits[0])
        assert_one_hot(got[3], tok)
        assert torch.equal(got[0], got[3])  # the unconditional row is fed the image's token
        assert_one_hot(got[2], expected_token(PLAIN_P, t, logits[2]))
        assert torch.equal(got[1], logits[1])  # a request without our extra_args is left alone
        drawn.add(tok)
        for out, row in ((out_c, 3), (out_u, 0), (out_x, 2)):
            out.append(int(got[row].argmax()))
    assert proc.draws.parted == set()
    # vLLM's allowed_token_ids would have put -inf there first: still no NaN, still one-hot
    masked = torch.randn(4, V)
    masked[:, :LO] = float("-inf")
    got = proc.apply(masked.clone())
    assert not torch.isnan(got).any()
    assert_one_hot(got[3], expected_token(CFG_P, 3, masked[3], masked[0]))


def test_a_steady_step_makes_no_tensor_from_the_host(monkeypatch):
    """The per-row settings, rows and uniforms live on the device from the step the batch changes: the steps after
    it make no tensor from host values (each one a copy that waits for the queue on a GPU), and still draw the torch
    engine's tokens; a request joining makes the next step build them again."""
    import simplear.vllm_cfg as vllm_cfg

    made = []
    real_tensor, real_to_device = torch.tensor, vllm_cfg.to_device
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append("tensor") or real_tensor(*a, **k))
    monkeypatch.setattr(vllm_cfg, "to_device", lambda *a, **k: made.append("to_device") or real_to_device(*a, **k))
    proc = CFGLogitsProcessor()
    out_c, out_u, out_x = [], [], []
    proc.update_state(update(3, added=[(0, vparams(CFG_P, "a", "uncond", max_tokens=8), [1], out_u),
                                       (1, vparams(PLAIN_P, max_tokens=8), [1], out_x),
                                       (2, vparams(CFG_P, "a", "cond", max_tokens=8), [1], out_c)]))
    torch.manual_seed(0)
    per_step = []
    for t in range(5):
        made.clear()
        logits = torch.randn(3, V)
        got = proc.apply(logits.clone())
        per_step.append(len(made))
        assert_one_hot(got[2], expected_token(CFG_P, t, logits[2], logits[0]))
        assert_one_hot(got[1], expected_token(PLAIN_P, t, logits[1]))
        for out, row in ((out_c, 2), (out_u, 0), (out_x, 1)):
            out.append(int(got[row].argmax()))
    assert per_step[0] > 0 and per_step[1:] == [0, 0, 0, 0], per_step
    late = SamplingParams(seed=9)
    proc.update_state(update(4, added=[(3, vparams(late, max_tokens=8), [1], [])]))
    made.clear()
    logits = torch.randn(4, V)
    got = proc.apply(logits.clone())
    assert made and proc.draws.parted == set()
    assert_one_hot(got[3], expected_token(late, 0, logits[3]))
    assert_one_hot(got[2], expected_token(CFG_P, 5, logits[2], logits[0]))


def test_processor_follows_moves_swaps_and_removals():
    from vllm.v1.sample.logits_processor import MoveDirectionality

    proc = CFGLogitsProcessor()
    torch.manual_seed(1)
    oc, ou, ob = [], [], []
    proc.update_state(update(3, added=[(0, vparams(CFG_P, "a", "cond"), [1], oc), (1, vparams(PLAIN_P), [1], ob),
                                       (2, vparams(CFG_P, "a", "uncond"), [1], ou)]))
    proc.update_state(update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))  # cond now at 2, uncond at 0
    logits = torch.randn(3, V)
    got = proc.apply(logits.clone())
    assert_one_hot(got[2], expected_token(CFG_P, 0, logits[2], logits[0]))
    assert torch.equal(got[0], got[2])
    proc.update_state(update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))  # condense
    logits = torch.randn(2, V)
    got = proc.apply(logits.clone())
    assert_one_hot(got[1], expected_token(CFG_P, 0, logits[1], logits[0]))
    assert torch.equal(got[0], got[1]) and proc.draws.parted == set()


def test_a_parted_pair_is_stopped_at_the_step_it_parts(caplog):
    """A preempted row leaves its partner sampled alone: that very step writes the stop id into the partner, and the
    pair stays parted when the row comes back. A pair whose rows are at different token indices parts the same way."""
    proc = CFGLogitsProcessor()
    torch.manual_seed(2)
    oc, ou, oc2, ou2 = [], [], [7, 7], [7]
    proc.update_state(update(2, added=[(0, vparams(CFG_P, "b", "cond"), [1], oc),
                                       (1, vparams(CFG_P, "b", "uncond"), [1], ou)]))
    got = proc.apply(torch.randn(2, V))
    assert torch.equal(got[0], got[1]) and got[0, LO:HI].max() == 0 and proc.draws.parted == set()
    oc.append(int(got[0].argmax()))
    ou.append(int(got[1].argmax()))
    proc.update_state(update(1, removed=[1]))  # vLLM preempts the unconditional row
    with caplog.at_level(logging.ERROR, logger="simplear.vllm_cfg"):
        got = proc.apply(torch.randn(1, V))
    assert_one_hot(got[0], STOP)
    assert proc.draws.parted == {"b"}
    assert "CFG pair b parted" in caplog.text and "cond row at token 1" in caplog.text
    proc.update_state(update(2, added=[(1, vparams(CFG_P, "b", "uncond"), [1], ou)]))  # resumed, in step again
    got = proc.apply(torch.randn(2, V))
    assert_one_hot(got[0], STOP) and assert_one_hot(got[1], STOP)
    # rows at different token indices (2 and 1) in one step: parted at once, and the plain pair b still stopped
    proc.update_state(update(4, added=[(2, vparams(CFG_P, "c", "cond"), [1], oc2),
                                       (3, vparams(CFG_P, "c", "uncond"), [1], ou2)]))
    got = proc.apply(torch.randn(4, V))
    for r in range(4):
        assert_one_hot(got[r], STOP)
    assert proc.draws.parted == {"b", "c"}


def _v2_request_state(slots: int):
    """What the V2 runner hands processors (`LogitsProcRequestState.from_request_state` reads these fields); the real
    `RequestState` needs pinned memory, which a CPU-only torch lacks."""
    lens = lambda: SimpleNamespace(np=np.zeros(slots, dtype=np.int32))  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), max_num_reqs=slots, vocab_size=V, all_token_ids=None,
                           prompt_len=lens(), prefill_len=lens(), total_len=None)


def _v2_step(req_states, slots: list[int], seq_lens: list[int]):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    idx = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                         input_ids=torch.zeros(len(slots), dtype=torch.int32),
                         pos=torch.tensor(seq_lens, dtype=torch.int64) - 1,
                         seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))


def _v2_add(proc, req_states, slot, params, prompt_len, prefill_len=None):
    """As the V2 runner admits a request: its request state, then each processor's `add_request`."""
    req_states.prompt_len.np[slot] = prompt_len
    req_states.prefill_len.np[slot] = prefill_len if prefill_len is not None else prompt_len
    return proc.add_request(slot, params)


def test_v2_processor_is_a_v2_logits_processor_drawing_by_slot():
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor, build_custom_logits_processors

    from simplear.vllm_cfg import logits_processor_class, logits_processor_class_v2

    cls = logits_processor_class_v2()
    assert issubclass(cls, LogitsProcessor)
    rs = _v2_request_state(6)
    [proc] = build_custom_logits_processors(None, rs, False, [cls])  # vLLM's own loader: it rejects anything else
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors(None, rs, False, [logits_processor_class()])
    assert _v2_add(proc, rs, 4, vparams(CFG_P, "a", "cond"), 9)  # prompts of different lengths: the pair's
    assert _v2_add(proc, rs, 1, vparams(CFG_P, "a", "uncond"), 2)  # token index comes from each row's own
    assert _v2_add(proc, rs, 0, vparams(PLAIN_P), 5)
    assert not _v2_add(proc, rs, 2, _plain(), 3)  # not ours: vLLM need not call apply for it
    torch.manual_seed(0)
    slots = [1, 2, 4, 0]  # batch order: uncond, unrelated, cond, plain
    for t in (0, 2):
        logits = torch.randn(4, V)
        got = proc.apply(logits.clone(), _v2_step(rs, slots, [2 + t, 3 + t, 9 + t, 5 + t]))
        assert_one_hot(got[2], expected_token(CFG_P, t, logits[2], logits[0]))
        assert torch.equal(got[0], got[2])
        assert_one_hot(got[3], expected_token(PLAIN_P, t, logits[3]))
        assert torch.equal(got[1], logits[1])
    # both rows preempted and resumed together, into other slots, with their 2 output tokens re-prefilled: in step,
    # at token 2 (flat logits: the token is LO + floor(8 u), and seed 7's uniforms 0 and 2 give different ones)
    assert _v2_add(proc, rs, 3, vparams(CFG_P, "a", "cond"), 9, prefill_len=11)
    assert _v2_add(proc, rs, 5, vparams(CFG_P, "a", "uncond"), 2, prefill_len=4)
    logits = torch.zeros(2, V)
    got = proc.apply(logits.clone(), _v2_step(rs, [5, 3], [4, 11]))
    assert expected_token(CFG_P, 2, logits[1], logits[0]) != expected_token(CFG_P, 0, logits[1], logits[0])
    assert_one_hot(got[1], expected_token(CFG_P, 2, logits[1], logits[0]))
    assert torch.equal(got[0], got[1]) and proc.draws.parted == set()


def test_v2_processor_stops_a_pair_whose_partner_is_not_sampled():
    from simplear.vllm_cfg import logits_processor_class_v2

    rs = _v2_request_state(4)
    proc = logits_processor_class_v2()(None, rs)
    torch.manual_seed(3)
    _v2_add(proc, rs, 0, vparams(CFG_P, "a", "cond"), 9)
    _v2_add(proc, rs, 1, vparams(CFG_P, "a", "uncond"), 2, prefill_len=6)  # re-prefilling after a preemption
    logits = torch.randn(2, V)
    got = proc.apply(logits.clone(), _v2_step(rs, [0, 1], [13, 4]))  # cond samples token 4; uncond is at 4 of 6
    assert_one_hot(got[0], STOP)
    assert torch.equal(got[1], logits[1])  # a row still prefilling: vLLM drops its token, left alone
    assert proc.draws.parted == {"a"}
    with pytest.raises(RuntimeError, match="speculative"):
        proc.apply(torch.randn(3, V), _v2_step(rs, [0, 1], [14, 6]))


@pytest.mark.parametrize("spec, message", [
    ({"visual": [5]}, "visual"),
    ({"visual": [8, 3]}, "visual"),
    ({"stop": LO + 1}, "stop"),
    ({"pair": "x", "role": "both", "sampling": {"cfg_scale": 2.0}}, "role"),
    ({"pair": "x", "role": "cond", "sampling": {"cfg_scale": 1.0}}, "pair"),
    ({"sampling": {"cfg_scale": 2.0}}, "pair"),
    ({"sampling": {"temperature": -1.0}}, "temperature"),
    ({"sampling": {"top_q": 0.5}}, "sampling"),
    ("nope", "must be a dict"),
])
def test_processor_rejects_bad_extra_args(spec, message):
    from vllm import SamplingParams as VParams

    from simplear.vllm_cfg import logits_processor_class_v2

    if isinstance(spec, dict):
        spec = {**request_spec(LO, HI, STOP, PLAIN_P, 0), **spec}
    for cls in (CFGLogitsProcessor, logits_processor_class_v2()):
        with pytest.raises(ValueError, match=message):
            cls.validate_params(VParams(extra_args={EXTRA_KEY: spec}))


# -- one vLLM engine against the torch engine -------------------------------------------------------

GRID = (8, 8)  # 64 tokens
PROMPTS = ["a red circle on a blue background", "green", "a small yellow star at the top left of a plain black background", ""]


VT = {"kind": "pixel-fsq", "levels": 4}  # the release's visual tokenizer, given (a release names none)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A release as published, bf16, slow-tokenizer files only. Its weights: seed 3's random model, whose greedy
    picks guidance and a negative prompt do change (test_greedy_codes_equal_torch_with_cfg)."""
    from release_support import as_slow_tokenizer
    from simplear.release import export_release

    root = tmp_path_factory.mktemp("vllm")
    release = export_release(make_checkpoint(root / "ckpt", seed=3), root / "release")
    return as_slow_tokenizer(release)


def release_checkpoint(path):
    from simplear.model import load_checkpoint
    from simplear.release import visual_tokenizer_arg

    return load_checkpoint(path, dtype=torch.float32, visual_tokenizer=visual_tokenizer_arg(VT))


@pytest.fixture(scope="module")
def torch_sampler(checkpoint):
    ckpt = release_checkpoint(checkpoint)
    return TorchSampler(ckpt.model, ckpt.vocab)


@pytest.fixture(scope="module")
def vllm_engine(ray_head, checkpoint):
    """VLLMSampler in a Ray actor: vLLM binds threads and patches torch in its process, which must not be pytest's."""
    import ray

    from conftest import attach_ray
    from simplear.vllm_engine import VLLMSampler

    from simplear.model import checkpoint_meta
    from simplear.release import visual_tokenizer_arg

    attach_ray(ray_head)
    options = {"max_num_seqs": 4, "kv_cache_gib": 0.25, "dtype": "float32"}  # the torch engine's float32 over bf16 weights
    meta = checkpoint_meta(checkpoint, visual_tokenizer_arg(VT))  # what serve and eval hand it for a release
    actor = ray.remote(num_cpus=0)(VLLMSampler).remote(str(checkpoint), None, options, 64, 64, meta=meta)

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
    plain = torch_sampler.generate_codes(PROMPTS, GRID, SamplingParams(cfg_scale=1.0, temperature=0))
    # guidance, and a negative prompt, did change the picks: the comparison above means something
    assert not torch.equal(want[0], plain[0]) and not torch.equal(want[2], plain[2])


def test_seeded_codes_equal_torch(vllm_engine, torch_sampler):
    """The processor draws from the torch engine's per-request streams: sampled codes, with and without CFG, with
    temperature, top-k and top-p, are the torch engine's for the same seeds (fp32), pair by pair."""
    params = [SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=16, top_p=0.9, seed=123),
              SamplingParams(cfg_scale=1.0, temperature=1.3, seed=5),
              SamplingParams(cfg_scale=3.0, temperature=1.0, top_p=0.8, seed=7, negative_prompt="a green square"),
              SamplingParams(cfg_scale=1.5, temperature=0.7, top_k=5, seed=123)]
    got = vllm_engine("generate_codes", PROMPTS, GRID, params)
    want = torch_sampler.generate_codes(PROMPTS, GRID, params)
    assert torch.equal(got, want)
    greedy = torch_sampler.generate_codes(PROMPTS, GRID, [SamplingParams(cfg_scale=p.cfg_scale, temperature=0)
                                                          for p in params])
    assert (want != greedy).float().mean() > 0.5  # far from the greedy picks: the equality is one of draws


def test_the_eval_stage_draws_the_torch_engines_images_through_vllm(vllm_engine, torch_sampler, checkpoint, tmp_path):
    """The eval stage's drawing (`simplear.evaluation.generate`) with `engine: vllm`: batched calls of several
    prompts x samples, each image its own seed, write the very PNGs the torch engine writes."""
    from simplear.evaluation.generate import Checkpoint, SetPlace, generate_set, set_key
    from simplear.scorers import items_from_prompts
    from simplear.visual_tokenizers import load_visual_tokenizer

    vt_config = release_checkpoint(checkpoint).visual_tokenizer_config
    from simplear.sampling.spec import SamplingSpec

    sampling = SamplingSpec(cfg_scale=2.0, top_k=16, negative_prompt="a dark plain background",
                            prompt_template="a picture of {prompt}").complete()
    ck = Checkpoint(name="c", path=str(checkpoint), grid=GRID, visual_tokenizer=vt_config, key="k", sampling=sampling)
    items, vt = items_from_prompts(PROMPTS[:3]), load_visual_tokenizer(vt_config)
    engines = {"torch": torch_sampler, "vllm": SimpleNamespace(generate_codes=lambda *a: vllm_engine("generate_codes", *a))}
    for name, engine in engines.items():
        key = set_key(ck, items, sampling, 7, 2, name)
        place = SetPlace(run=str(tmp_path), stage=name, folder="set")
        assert generate_set(engine, vt, ck, items, place, key, sampling, 7, 2, batch_size=4, grids=False)[0] == 3
    pngs = {name: [(tmp_path / name / "set" / f"{i:05d}" / "samples" / f"{j:04d}.png").read_bytes() for i in range(3) for j in range(2)]
            for name in engines}
    assert pngs["vllm"] == pngs["torch"]
    assert len(set(pngs["torch"])) == 6  # every image its own seed


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


def test_admission_leaves_the_null_block_and_the_watermark_out():
    """A cache of 12 blocks admits 11 (vLLM's block pool keeps a null block): two images of 6 blocks each, exactly the
    cache, go in two chunks, not one that vLLM would admit and then preempt a row of; with a 0.1 watermark, 10."""
    from simplear.vllm_engine import VLLMOptions, VLLMSampler, _Job, admissible_blocks

    assert (admissible_blocks(12), admissible_blocks(12, 0.1), admissible_blocks(0)) == (11, 10, 0)
    eng = VLLMSampler.__new__(VLLMSampler)
    eng.options = VLLMOptions(max_num_seqs=8)
    eng.max_batched_tokens, eng.block_size, eng.num_blocks = 1000, 16, admissible_blocks(12)
    pair = lambda i: _Job(i, [([0] * 12, None), ([0] * 12, None)])  # noqa: E731  (a CFG pair: 12 prompt tokens a row)
    assert [len(c) for c in eng._chunks([pair(0), pair(1)], N=36)] == [1, 1]  # 48 tokens: 3 blocks a row, 12 in all
    assert [len(c) for c in eng._chunks([pair(0), pair(1)], N=20)] == [2]  # 32 tokens: 2 blocks a row, 8 in all


def test_a_parted_image_raises_at_its_token():
    """What the processor leaves in vLLM's outputs when a pair parts (the stop id, then nothing) fails the call, naming
    the image and the token; so do rows that differ."""
    from simplear.vllm_engine import VLLMOptions, VLLMSampler
    from simplear.vocab import Vocabulary

    eng = VLLMSampler.__new__(VLLMSampler)
    eng.options, eng.vocab = VLLMOptions(max_num_seqs=4), Vocabulary("tiny", codebook_size=8)
    eng.max_text_tokens, eng.max_image_tokens, eng.max_batched_tokens, eng.block_size, eng.num_blocks = 16, 4, 64, 16, 0
    vo, pad = eng.vocab.visual_offset, eng.vocab.pad_id

    def serve(rows):
        out = lambda ids: SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)])  # noqa: E731
        eng.llm = SimpleNamespace(generate=lambda prompts, params, use_tqdm: [out(ids) for ids in rows])

    cfg = SamplingParams(cfg_scale=2.0, seed=1)
    serve([[vo + 1, vo + 2, vo + 3, vo + 4], [vo + 1, vo + 2, vo + 3, vo + 4]])
    assert eng.generate_codes(["a"], (2, 2), cfg).flatten().tolist() == [1, 2, 3, 4]
    serve([[vo + 1, pad], [vo + 1, pad]])
    with pytest.raises(RuntimeError, match="image 0: .* at token 1 of 4"):
        eng.generate_codes(["a"], (2, 2), cfg)
    serve([[vo + 1, vo + 2, vo + 3, vo + 4], [vo + 1, vo + 2, vo + 5, vo + 4]])
    with pytest.raises(RuntimeError, match="at token 2 of 4"):
        eng.generate_codes(["a"], (2, 2), cfg)
