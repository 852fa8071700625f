"""`protocol: simplear`: a prompt set drawn as the reference benchmark scripts draw it. The texts and negative
prompts equal those of a re-run of the reference's evaluation loader (its dataset's draws, re-implemented here,
through a real torch DataLoader with its worker count and seed, per GPU chunk); the eval stage draws with them at
the scripts' settings, and the report names the protocol and cites a release's published figure beside ours."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from release_support import PIXEL_FSQ, build_release
from simplear.evaluation.protocol import (BENCHMARK_NEGATIVE, STYLE_PREFIXES, ReferenceProtocol, reference_requests,
                                          release_name)

PROMPTS = [f"a photo of {n} {thing}" for n in ("one", "two", "three", "four") for thing in
           ("dog", "cat", "bench", "kite", "apple", "clock", "vase", "boat", "bear", "toaster")][:37]


class _ReferenceEvalSet(torch.utils.data.Dataset):
    """The draws of the reference evaluation dataset's items (simpar/train/t2i_data.py EvalT2IDataset with its
    preprocess_t2i at p_drop_cond 0): the prompt's conversation, then the negative prompt's, each a caption-dropout
    draw and a style prefix, from the process's `random`."""

    def __init__(self, prompts):
        self.prompts = prompts

    def __len__(self):
        return len(self.prompts)

    @staticmethod
    def _conversation(text: str) -> str:
        if random.random() < 0.0:
            return "<|t2i|><|soi|>"
        return "<|t2i|>" + random.choice(STYLE_PREFIXES) + text + "<|soi|>"

    def __getitem__(self, i):
        return self._conversation(self.prompts[i]), self._conversation(BENCHMARK_NEGATIVE)


def _reference_run(prompts, seed: int, chunks: int, workers: int) -> list[tuple[str, str]]:
    """model_t2i.py's loop per GPU process: seeds set, its chunk (split_list's ceil-sized slices), a DataLoader of
    batch 1, no shuffling, `workers` workers."""
    size = -(-len(prompts) // chunks)
    out = []
    for start in range(0, len(prompts), size):
        random.seed(seed)
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(_ReferenceEvalSet(prompts[start: start + size]), batch_size=1,
                                             num_workers=workers, shuffle=False, collate_fn=lambda batch: batch[0])
        out += [(t[len("<|t2i|>"): -len("<|soi|>")], n[len("<|t2i|>"): -len("<|soi|>")]) for t, n in loader]
    return out


@pytest.mark.parametrize("seed,chunks,workers", [(0, 1, 4), (0, 3, 4), (7, 2, 0)])
def test_texts_and_negative_prompts_equal_the_reference_loaders(seed, chunks, workers):
    state = random.getstate(), torch.random.get_rng_state()
    try:
        expected = _reference_run(PROMPTS, seed, chunks, workers)
    finally:
        random.setstate(state[0])
        torch.random.set_rng_state(state[1])
    got = reference_requests(PROMPTS, ReferenceProtocol(seed=seed, chunks=chunks, loader_workers=workers))
    assert [(r.text, r.negative_prompt) for r in got] == expected
    assert len({r.text[: -len(p)] for r, p in zip(got, PROMPTS)}) > 5  # the prefixes vary: the draws matter
    other = reference_requests(PROMPTS, ReferenceProtocol(seed=seed + 1, chunks=chunks, loader_workers=workers))
    assert [r.text for r in other] != [r.text for r in got]


def test_release_names_are_recognised():
    assert release_name("Daniel0724/SimpleAR-0.5B-RL") == "simplear-0.5b-rl"
    assert release_name("/ckpts/simpar_0.5B_rl/") == "simplear-0.5b-rl"
    assert release_name("checkpoints/simplear-1.5b-grpo") == "simplear-1.5b-rl"
    assert release_name("runs/demo/grpo/final") is None


def test_a_protocol_set_draws_the_reference_texts_and_the_report_cites_the_release(tmp_path):
    """A GenEval file (one line with a `reprompt`) under `protocol: simplear`, `max_prompts` 2: the items keep their
    prompts for the scorers, the engine is asked the reference texts (decided over the whole file), each with its
    own negative prompt, at CFG 6; the key records them; the report names the protocol and the release's figure."""
    from simplear.config import ConfigError
    from simplear.evaluation.config import EvalStageConfig
    from simplear.evaluation.generate import SetPlace, generate_set, set_key
    from simplear.evaluation.prompts import load_items
    from simplear.evaluation.protocol import BENCHMARK_SAMPLING
    from simplear.evaluation.report import render_html
    from simplear.evaluation.stage import protocol_entry, resolve_checkpoints
    from simplear.model import load_checkpoint
    from simplear.release import visual_tokenizer_arg
    from simplear.sampler import TorchSampler
    from simplear.visual_tokenizers import tensor_to_pil

    lines = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat",
              "reprompt": "a photo of a fluffy cat"},
             {"tag": "single_object", "include": [{"class": "kite", "count": 1}], "prompt": "a photo of a kite"}]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(line) + "\n" for line in lines))
    release = build_release(tmp_path / "SimpleAR-0.5B-RL")
    sets = [{"name": "geneval", "source": "geneval", "path": str(meta), "max_prompts": 2, "protocol": "simplear",
             "scorers": [{"kind": "shapes"}]}]
    cfg = EvalStageConfig.model_validate({"prompt_sets": sets, "checkpoints": [
        {"path": str(release), "size": 32, "visual_tokenizer": PIXEL_FSQ}]})
    with pytest.raises(ValueError, match="protocol draws 4 images per prompt"):
        EvalStageConfig.model_validate({"prompt_sets": sets, "samples_per_prompt": 2, "checkpoints": [
            {"path": str(release), "size": 32, "visual_tokenizer": PIXEL_FSQ}]})
    ctx = SimpleNamespace(needs=[], config_path=lambda v: Path(v))
    items, requests = load_items(ctx, cfg.prompt_sets[0], "w")
    full = reference_requests([line.get("reprompt", line["prompt"]) for line in lines], ReferenceProtocol())
    assert [i.prompt for i in items] == ["a photo of a dog", "a photo of a cat"] and requests == full[:2]
    assert requests[1].text.endswith("a photo of a fluffy cat") and requests[1].negative_prompt.endswith(BENCHMARK_NEGATIVE)

    (ck,) = resolve_checkpoints(ctx, cfg, "stages.eval.config")
    assert ck.release == "simplear-0.5b-rl"
    place = SetPlace(run=str(tmp_path / "run"), stage="eval", folder="geneval")
    key = set_key(ck, items, BENCHMARK_SAMPLING, 0, 4, "torch", requests)
    assert key != set_key(ck, items, BENCHMARK_SAMPLING, 0, 4, "torch")
    loaded = load_checkpoint(release, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ))
    sampler = TorchSampler(loaded.model.float(), loaded.vocab)
    vt = loaded.load_visual_tokenizer()
    assert generate_set(sampler, vt, ck, items, place, key, BENCHMARK_SAMPLING, 0, 4, 8, False, requests)[0] == 2
    params = BENCHMARK_SAMPLING.params(4 + 1)  # prompt 1, image 1: seed 0 + 1 x 4 + 1
    assert params.cfg_scale == 6.0 and not params.is_filtered(64)
    params.negative_prompt = requests[1].negative_prompt
    want = vt.decode(sampler.generate_codes([requests[1].text], ck.grid, [params]))
    png = tmp_path / "run" / "eval" / "geneval" / "00001" / "samples" / "0001.png"
    assert tensor_to_pil(want[0]).tobytes() == Image.open(png).convert("RGB").tobytes()

    entry = protocol_entry(cfg.prompt_sets[0], [ck])
    assert entry["protocol"]["kind"] == "simplear" and entry["protocol"]["not_at_its_size"] == {ck.name: [32, 32]}
    assert entry["reference"] == {}  # a shapes set: no published figure to cite
    geneval_set = cfg.prompt_sets[0].model_copy(update={"scorers": [SimpleNamespace(kind="geneval")]})
    entry = protocol_entry(geneval_set, [ck])
    assert entry["reference"]["geneval"][ck.name]["figure"] == 0.59
    report = {"checkpoints": [{"name": ck.name, "path": ck.path, "size": [32, 32]}], "sets": {"geneval": {
        "scores": {"geneval": {ck.name: {"overall": {"mean": 0.1, "se": 0.05, "count": 8}}}}, "grids": [], **entry}}}
    page = render_html(report)
    assert "Protocol simplear" in page and "geneval: published" in page and "0.590" in page
    with pytest.raises(ConfigError, match="give its visual tokenizer"):
        resolve_checkpoints(ctx, EvalStageConfig.model_validate({"prompt_sets": sets, "checkpoints": [
            {"path": str(release), "size": 32}]}), "stages.eval.config")
