"""Released SimpleAR checkpoints as published (a stand-in built the reference code's way, tests/release_support.py):
read with the visual tokenizer they are given, refused clearly without one or with the wrong one, imported into a
self-describing folder with the same weights, and drawn from by `simplear generate` either way."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from release_support import PIXEL_FSQ, QWEN25_ADDED, build_release
from simplear.cli import main
from simplear.model import is_checkpoint, load_checkpoint
from simplear.release import visual_tokenizer_arg
from simplear.sampler import SamplingParams, TorchSampler
from simplear.vocab import SPECIALS


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("release") / "SimpleAR-stand-in")


def greedy_codes(ck, prompts=("a red circle", "a blue square")):
    sampler = TorchSampler(ck.model.float(), ck.vocab)
    return sampler.generate_codes(list(prompts), (4, 4), [SamplingParams(cfg_scale=3.0, temperature=0)] * len(prompts))


def test_a_release_loads_with_its_visual_tokenizer_in_the_reference_layout(release):
    vt = visual_tokenizer_arg(json.dumps(PIXEL_FSQ))
    ck = load_checkpoint(release, visual_tokenizer=vt)
    tok = ck.vocab.text_tokenizer
    first = ck.vocab.t2i_id
    assert max(tok.convert_tokens_to_ids(QWEN25_ADDED)) == first - 1  # the base tokenizer's own added tokens, then
    assert tok.convert_ids_to_tokens(list(range(first, ck.vocab.visual_offset))) == list(SPECIALS)
    assert ck.vocab.size == ck.model.get_input_embeddings().weight.shape[0] == len(tok) + 64
    assert ck.model.dtype == torch.bfloat16  # as published
    assert ck.visual_tokenizer_config.codebook_size == 64
    # the project's own vocabulary over the same base tokenizer lays the specials out the same way
    from simplear.tiny import build_tiny_text_tokenizer
    from simplear.vocab import Vocabulary

    base = build_tiny_text_tokenizer()
    base.add_tokens(QWEN25_ADDED, special_tokens=True)
    ours = Vocabulary(base, codebook_size=64)
    assert (ours.t2i_id, ours.soi_id, ours.visual_offset, ours.size) == (ck.vocab.t2i_id, ck.vocab.soi_id,
                                                                         ck.vocab.visual_offset, ck.vocab.size)


def test_a_release_with_slow_tokenizer_files_only_reads_as_the_fast_one(release, tmp_path):
    """The RL releases ship vocab.json/merges.txt and a 4.x tokenizer_config.json listing the added tokens, no
    tokenizer.json: the same ids, specials and embedding rows as the stand-in with tokenizer.json, the same greedy
    codes, and `simplear import` takes it."""
    slow = build_release(tmp_path / "slow", slow_tokenizer=True)
    assert not (slow / "tokenizer.json").exists() and (slow / "merges.txt").exists()
    vt = visual_tokenizer_arg(PIXEL_FSQ)
    a, b = load_checkpoint(slow, visual_tokenizer=vt), load_checkpoint(release, visual_tokenizer=vt)
    prompt = "<|t2i|> a red circle, on a blue background<|soi|>"
    assert a.vocab.prompt_ids(prompt) == b.vocab.prompt_ids(prompt) and a.vocab.size == b.vocab.size == 703
    assert [a.vocab.text_tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(632, 639))
    assert torch.equal(greedy_codes(a), greedy_codes(b))
    assert main(["import", str(slow), "--visual-tokenizer", json.dumps(PIXEL_FSQ), "-o", str(tmp_path / "imported")]) == 0
    assert torch.equal(greedy_codes(load_checkpoint(tmp_path / "imported")), greedy_codes(b))


def test_a_release_without_or_with_the_wrong_visual_tokenizer_is_refused_clearly(release):
    with pytest.raises(ValueError, match="give its visual tokenizer"):
        load_checkpoint(release)
    with pytest.raises(ValueError, match="703 embedding rows, but its tokenizer's 639 ids \\+ the visual tokenizer's 125 codes make 764"):
        load_checkpoint(release, visual_tokenizer=visual_tokenizer_arg({"kind": "pixel-fsq", "levels": 5}))


def test_import_keeps_the_weights_and_draws_what_the_release_draws(release, tmp_path):
    out = tmp_path / "imported"
    assert main(["import", str(release), "--visual-tokenizer", json.dumps(PIXEL_FSQ), "-o", str(out)]) == 0
    assert is_checkpoint(out) and not is_checkpoint(release)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out / "model.safetensors") == digest(release / "model.safetensors")
    meta = json.loads((out / "simplear.json").read_text())
    assert meta["extra"]["release"]["source"] == str(release) and meta["extra"]["release"]["torch_dtype"] == "bfloat16"
    direct = load_checkpoint(release, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ))
    imported = load_checkpoint(out)
    assert imported.vocab.metadata() | {"text_tokenizer": ""} == direct.vocab.metadata() | {"text_tokenizer": ""}
    assert torch.equal(greedy_codes(imported), greedy_codes(direct))
    # a second import into the same folder is refused, never merged
    assert main(["import", str(release), "--visual-tokenizer", json.dumps(PIXEL_FSQ), "-o", str(out)]) == 2


def test_generate_draws_from_a_release_as_published(release, tmp_path, capsys):
    png = tmp_path / "out.png"
    args = ["generate", "a red circle", "--model", str(release), "--size", "32", "--seed", "3", "-o", str(png)]
    assert main(args) == 2 and "--visual-tokenizer" in capsys.readouterr().err
    assert main([*args, "--visual-tokenizer", json.dumps(PIXEL_FSQ)]) == 0
    from PIL import Image

    assert Image.open(png).size == (32, 32)


def test_sft_and_grpo_init_take_a_release_with_its_visual_tokenizer_and_a_step_learns(release):
    """`init:` a release as published: resolved with the stage's `visual_tokenizer`, loaded in fp32 by the training
    task, and an optimizer step on its own sequences lowers the loss; without the key, the error names it."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from simplear.config import ConfigError
    from simplear.t2i import SequenceSpec, T2ITask, resolve_init
    from simplear.train_data import Position

    ctx = SimpleNamespace(needs=["tokenize"], config_path=Path)
    with pytest.raises(ConfigError, match="stages.sft.config.visual_tokenizer"):
        resolve_init(ctx, str(release), "stages.sft.config")
    init = resolve_init(ctx, str(release), "stages.sft.config", visual_tokenizer_arg(PIXEL_FSQ))
    location, vt = init.location, init.visual_tokenizer
    assert location == str(release) and vt.codebook_size == 64
    task = T2ITask(sequence=SequenceSpec(cfg_dropout=0.0), caption="original", samples=None, grid=(4, 4), seed=0,
                   checkpoint=location, visual_tokenizer=vt)
    bundle = task.build(torch.device("cpu"), None)
    assert bundle.model.dtype == torch.float32 and bundle.vocab.size == 703
    rows = {"caption": np.array(["a red circle", "a blue square"], dtype=object),
            "codes": np.array([np.arange(16) % 64, (np.arange(16) * 7) % 64], dtype=object)}
    batch = task.collate(rows, Position(0, 0), 0, bundle)
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss, _ = task.loss(bundle.model, batch, bundle)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_eval_and_serve_draw_from_a_release_as_published(release, tmp_path):
    """The eval stage's `checkpoints: [{path, visual_tokenizer}]` and serve's `visual_tokenizer:` read the release
    unchanged: the same greedy codes as the release loaded directly."""
    from types import SimpleNamespace

    from simplear.config import ConfigError
    from simplear.evaluation.config import EvalStageConfig
    from simplear.evaluation.stage import resolve_checkpoints
    from simplear.evaluation.workers import open_engine
    from simplear.serving import ServeConfig
    from simplear.serving.app import build_engine

    want = greedy_codes(load_checkpoint(release, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ)))
    sets = [{"name": "p", "source": "list", "items": ["a red circle"], "scorers": [{"kind": "shapes"}]}]
    cfg = EvalStageConfig.model_validate({"prompt_sets": sets, "sampling": {"cfg_scale": 3.0, "temperature": 0},
                                          "checkpoints": [{"path": str(release), "size": 32, "visual_tokenizer": PIXEL_FSQ}]})
    ctx = SimpleNamespace(needs=[], config_path=lambda v: tmp_path / v)
    (ck,) = resolve_checkpoints(ctx, cfg, "stages.eval.config")
    assert (ck.name, ck.grid, ck.key.startswith("folder:")) == ("SimpleAR-stand-in", (4, 4), True)
    engine, _ = open_engine(cfg, ck, torch.device("cpu"))
    params = [SamplingParams(cfg_scale=3.0, temperature=0)] * 2
    assert torch.equal(engine.generate_codes(["a red circle", "a blue square"], (4, 4), params), want)
    bare = EvalStageConfig.model_validate({"prompt_sets": sets, "checkpoints": [{"path": str(release), "size": 32}]})
    with pytest.raises(ConfigError, match="give its visual tokenizer"):
        resolve_checkpoints(ctx, bare, "stages.eval.config")

    served, _ = build_engine(str(release), ServeConfig(checkpoint=str(release), engine="torch", visual_tokenizer=PIXEL_FSQ,
                                                    sizes=["32x32"]))
    assert torch.equal(served.generate_codes(["a red circle", "a blue square"], (4, 4), params), want)


def test_export_writes_the_release_format_and_round_trips(release, tmp_path):
    """import -> export -> import keeps weights and vocabulary; the export is a release as published (bf16, 4.x
    config keys, no simplear.json, a model card with the eval figures); an older two-specials checkpoint is refused."""
    from safetensors.torch import load_file

    from simplear.model import save_checkpoint
    from simplear.tiny import build_tiny_text_tokenizer
    from simplear.vocab import SOI, T2I, Vocabulary

    imported, exported, again = tmp_path / "imported", tmp_path / "exported", tmp_path / "again"
    vt = json.dumps(PIXEL_FSQ)
    assert main(["import", str(release), "--visual-tokenizer", vt, "-o", str(imported)]) == 0
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"checkpoints": [{"name": "rl"}], "notes": ["our own scorer"],
                                  "sets": {"geneval": {"scores": {"geneval": {"rl": {"overall": {"mean": 0.59}}}}}}}))
    assert main(["export", str(imported), "-o", str(exported), "--report", str(report)]) == 0
    assert not is_checkpoint(exported)
    config = json.loads((exported / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config
    card = (exported / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "| geneval | geneval | 0.590 |" in card and "64 codes" in card
    assert main(["import", str(exported), "--visual-tokenizer", vt, "-o", str(again)]) == 0
    a, b = load_file(release / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(again).vocab.metadata() | {"text_tokenizer": ""} == load_checkpoint(imported).vocab.metadata() | {"text_tokenizer": ""}

    old_tok = build_tiny_text_tokenizer()
    old_tok.add_tokens([T2I, SOI], special_tokens=True)
    old = Vocabulary(old_tok, codebook_size=64, add_specials=False)
    ck = load_checkpoint(imported)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from simplear.tiny import TINY_QWEN2

    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY_QWEN2, "vocab_size": old.size}))
    save_checkpoint(tmp_path / "old", model, old, ck.visual_tokenizer_config)
    assert main(["export", str(tmp_path / "old"), "-o", str(tmp_path / "old-export")]) == 2


def test_a_grpo_step_from_a_release(release, tmp_path):
    """GRPO's trainer starts from the release as published (init with its visual tokenizer): rollouts are drawn,
    decoded and rewarded, and an optimizer step runs on it."""
    from test_grpo import make_task

    from simplear.grpo.trainer import build_trainer
    from simplear.train import TrainConfig

    torch.manual_seed(0)
    task = make_task(release, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ), grid=(4, 4))
    trainer = build_trainer(task, TrainConfig(steps=1, global_batch_size=8, lr=1e-3), str(tmp_path / "hf"), device="cpu")
    assert trainer.vocab.size == 703
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logged = [r for r in trainer.state.log_history if "rewards/color_match/mean" in r]
    assert logged and 0 <= logged[0]["rewards/color_match/mean"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
