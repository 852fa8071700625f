"""The reference sampling mode (`mode: reference`): the torch engine draws as the reference code's Hugging Face
`generate` does (its repetition penalty on the conditional logits, its CFG processor, top-k/top-p over the whole
vocabulary, a text id kept in the sequence and decoded as code 0). Checked against a re-implementation of the
reference loop on HF `generate` itself, on a stand-in release whose rows were spread as training spreads them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from release_support import GENERATION_CONFIG, PIXEL_FSQ, build_release
from simplear.model import load_checkpoint
from simplear.release import visual_tokenizer_arg
from simplear.sampler import TorchSampler
from simplear.sampling.spec import SamplingSpec

PROMPT, NEGATIVE, GRID = "a red circle on a blue background", "a dark plain background", (4, 4)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release whose first text id after the specials is likely enough to be drawn now and then."""
    path = build_release(tmp_path_factory.mktemp("release") / "SimpleAR-stand-in", seed=1, spread=0.6)
    ck = load_checkpoint(path, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ))
    model = ck.model.float()
    with torch.no_grad():
        weight = model.get_input_embeddings().weight  # tied to the head
        weight.mul_(6)  # spread logits, so that greedy picks do not hinge on float noise
        weight[100] = 1.2 * weight[ck.vocab.visual_offset + 17]  # a text id outscoring code 17, the stand-in's first pick
    return model, ck.vocab, ck.sampling


class _ReferenceCFG:
    """The reference's CFG logits processor (simpar/model/language_model/simpar_qwen2.py CFGLogits), re-implemented:
    log-softmax of the scores HF hands it, the unconditional rows run on their own cache fed the same tokens, and
    u + s (c - u)."""

    def __init__(self, scale: float, negative_ids: torch.Tensor, model):
        self.scale, self.negative_ids, self.model, self.out = scale, negative_ids, model, None

    def __call__(self, input_ids, scores):
        scores = F.log_softmax(scores, dim=-1)
        if self.scale == 1:
            return scores
        if self.out is None:
            self.out = self.model(self.negative_ids, use_cache=True)
        else:
            self.out = self.model(input_ids[:, -1:], use_cache=True, past_key_values=self.out.past_key_values)
        uncond = F.log_softmax(self.out.logits[:, -1], dim=-1)
        return self.scale * (scores - uncond) + uncond


def _reference_greedy(model, vocab, scale: float, penalty: float):
    """model_t2i.py's `generate_visual` call, greedy: ids drawn, the scores HF's processors made of each step."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([vocab.prompt_ids(PROMPT)])
    negative = torch.tensor([vocab.prompt_ids(NEGATIVE)])
    model.generation_config.eos_token_id = None  # 16 tokens, as the reference's max_new_tokens makes an image's
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                         repetition_penalty=penalty, pad_token_id=vocab.pad_id, use_cache=True,
                         logits_processor=LogitsProcessorList([_ReferenceCFG(scale, negative, model)]),
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.scores)[:, 0]


@pytest.mark.parametrize("scale,penalty", [(3.0, GENERATION_CONFIG["repetition_penalty"]), (1.0, 1.0), (6.0, 1.3)])
def test_greedy_codes_and_step_log_probs_equal_the_reference_loops(release, scale, penalty):
    model, vocab, _ = release
    spec = SamplingSpec(mode="reference", cfg_scale=scale, temperature=0, repetition_penalty=penalty,
                        negative_prompt=NEGATIVE, prompt_template="{prompt}")
    codes, logps = TorchSampler(model, vocab).generate_codes([PROMPT], GRID, [spec.params(0)], return_logprobs=True)
    ids, scores = _reference_greedy(model, vocab, scale, penalty)
    want = (ids - vocab.visual_offset).clamp(0, vocab.codebook_size - 1)  # the reference's decode of an id
    assert torch.equal(codes.flatten(), want)
    expected = F.log_softmax(scores.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(logps.flatten(), expected, rtol=1e-4, atol=1e-4)
    visual = SamplingSpec(cfg_scale=scale, temperature=0, negative_prompt=NEGATIVE, prompt_template="{prompt}")
    if scale == 6.0:  # the stand-in draws text ids here: the modes differ, and the reference's clamp is exercised
        assert (ids < vocab.visual_offset).any()
        assert not torch.equal(TorchSampler(model, vocab).generate_codes([PROMPT], GRID, [visual.params(0)]), codes)


def test_each_steps_distribution_equals_hf_generates_when_sampling(release):
    """Sampled (temperature 0.8, top-k 200 and top-p 0.9 over the whole vocabulary): along the ids HF `generate`
    drew, the distribution the torch engine's functions make of each step (the repetition penalty, the CFG formula,
    the truncation) equals the one HF's processors made (softmax of its processed scores), at every id."""
    from transformers import LogitsProcessorList

    from simplear.sampler import RepetitionPenalty
    from simplear.sampling.draw import DrawSettings

    model, vocab, _ = release
    ids = torch.tensor([vocab.prompt_ids(PROMPT)])
    negative = torch.tensor([vocab.prompt_ids(NEGATIVE)])
    model.generation_config.eos_token_id = None
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=200,
                         top_p=0.9, max_new_tokens=16, repetition_penalty=1.3, pad_token_id=vocab.pad_id,
                         logits_processor=LogitsProcessorList([_ReferenceCFG(6.0, negative, model)]),
                         output_scores=True, return_dict_in_generate=True)
    drawn = out.sequences[0, ids.shape[1]:]
    params = SamplingSpec(mode="reference", cfg_scale=6.0, temperature=0.8, top_k=200, top_p=0.9,
                          repetition_penalty=1.3, negative_prompt=NEGATIVE).params(0)
    settings = DrawSettings.of([params], vocab.size, "cpu")
    penalty = RepetitionPenalty([params], [ids[0].tolist()], vocab.size, "cpu")
    with torch.no_grad():
        for t, hf_scores in enumerate(out.scores):
            c = model(torch.cat([ids, drawn[None, :t]], 1)).logits[:, -1, : vocab.size]
            u = model(torch.cat([negative, drawn[None, :t]], 1)).logits[:, -1, : vocab.size]
            ours = settings.truncated(settings.final_logprobs(penalty(torch.cat([c, u])))[:, None])[0, 0]
            torch.testing.assert_close(ours.float(), F.softmax(hf_scores[0].float(), -1), rtol=1e-4, atol=1e-5)
            penalty.saw(drawn[t: t + 1])
    assert len(set(drawn.tolist())) > 3  # a real draw, not one id over and over


def test_a_release_records_its_repetition_penalty_and_the_visual_only_engines_refuse_the_mode(release, tmp_path):
    from simplear.jacobi import JacobiSampler

    _, vocab, recorded = release
    assert recorded.repetition_penalty == GENERATION_CONFIG["repetition_penalty"] and recorded.mode == "visual"
    params = SamplingSpec(mode="reference").over(recorded).params(1)
    assert params.reference_mode and params.repetition_penalty == 1.1
    model = release[0]
    with pytest.raises(ValueError, match="runs on the torch engine"):
        JacobiSampler(TorchSampler(model, vocab), window=4).generate_codes([PROMPT], GRID, [params])


def test_a_batch_mixing_modes_draws_each_request_as_alone(release):
    model, vocab, _ = release
    sampler = TorchSampler(model, vocab)
    ref = SamplingSpec(mode="reference", cfg_scale=3.0, temperature=0.9, top_k=40, repetition_penalty=1.1,
                       negative_prompt=NEGATIVE, prompt_template="{prompt}").params(5)
    vis = SamplingSpec(cfg_scale=2.0, temperature=0.9, negative_prompt=NEGATIVE, prompt_template="{prompt}").params(6)
    both = sampler.generate_codes([PROMPT, PROMPT], GRID, [ref, vis])
    assert torch.equal(both[0], sampler.generate_codes([PROMPT], GRID, [ref])[0])
    assert torch.equal(both[1], sampler.generate_codes([PROMPT], GRID, [vis])[0])
