"""One sampling settings type with per-checkpoint defaults: a checkpoint records how it is drawn (a release as
published: the reference inference settings), and `simplear generate`, serve, eval, the training stages' grids and
GRPO take those unless told otherwise; a key given wins, the rest stays the checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from release_support import PIXEL_FSQ, build_release
from serve_support import make_checkpoint
from simplear.cli import main
from simplear.model import load_checkpoint
from simplear.release import visual_tokenizer_arg
from simplear.sampler import TorchSampler
from simplear.sampling.spec import DEFAULT_SAMPLING, REFERENCE_SAMPLING, SamplingSpec
from simplear.vocab import META_FILE

OURS = SamplingSpec(cfg_scale=3.0, temperature=0.9, top_k=40, negative_prompt="a dark plain background",
                    prompt_template="a photo of {prompt}")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A project checkpoint that records its own defaults (`OURS`), as a training stage with `defaults:` writes it."""
    path = make_checkpoint(tmp_path_factory.mktemp("ck") / "ck", seed=3)
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "sampling": OURS.model_dump(mode="json")}))
    return path


def test_what_a_checkpoint_records_is_what_it_is_drawn_with(recorded, tmp_path):
    """Saved checkpoints record complete settings; an older one without the record gets the built-in defaults; a
    release as published the reference code's (its template and negative prompt, CFG 6)."""
    from simplear.model import save_checkpoint

    assert load_checkpoint(recorded).sampling == OURS.complete()
    ck = load_checkpoint(recorded)
    saved = save_checkpoint(tmp_path / "again", ck.model, ck.vocab, ck.visual_tokenizer_config,
                            sampling=SamplingSpec(cfg_scale=2.0))
    assert json.loads((saved / META_FILE).read_text())["sampling"] == {
        "cfg_scale": 2.0, "temperature": 1.0, "negative_prompt": "", "prompt_template": "{prompt}", "mode": "visual",
        "repetition_penalty": 1.0}
    meta = json.loads((saved / META_FILE).read_text())
    del meta["sampling"]
    (saved / META_FILE).write_text(json.dumps(meta))
    assert load_checkpoint(saved).sampling == DEFAULT_SAMPLING
    release = build_release(tmp_path / "release")
    ref = load_checkpoint(release, visual_tokenizer=visual_tokenizer_arg(PIXEL_FSQ)).sampling
    assert ref == REFERENCE_SAMPLING.model_copy(update={"repetition_penalty": 1.1})  # its generation_config's
    assert ref.cfg_scale == 6.0 and ref.prompt_template.startswith("A highly realistic")
    assert ref.negative_prompt.startswith("An image of aerial view, overexposed")


def test_keys_given_win_and_the_rest_stays_the_checkpoints():
    merged = SamplingSpec(cfg_scale=1.0).over(OURS.complete())
    assert (merged.cfg_scale, merged.top_k, merged.negative_prompt) == (1.0, 40, "a dark plain background")
    assert SamplingSpec().is_empty() and not OURS.is_empty()
    with pytest.raises(ValueError, match="prompt_template must hold"):
        SamplingSpec(prompt_template="no slot")
    params = OURS.params(7)
    assert params.conditional("a {red} circle") == "a photo of a {red} circle"  # braces in a prompt stay as typed
    assert not SamplingSpec(top_k=64, top_p=1.0).params(0).is_filtered(64)  # all codes kept: nothing to sort
    assert SamplingSpec(top_k=63).params(0).is_filtered(64)


def _codes_of(png: Path, ck) -> torch.Tensor:
    from PIL import Image

    from simplear.visual_tokenizers import pil_to_tensor

    return ck.load_visual_tokenizer().encode(pil_to_tensor(Image.open(png).convert("RGB"))[None])


def test_generate_uses_the_checkpoints_defaults_unless_a_flag_says_otherwise(recorded, tmp_path, capsys):
    """`simplear generate` draws the image the checkpoint's own settings draw (template, negative prompt, CFG,
    temperature, top-k); a flag changes only its key."""
    ck = load_checkpoint(recorded)
    sampler = TorchSampler(ck.model, ck.vocab, ck.load_visual_tokenizer())
    args = ["generate", "a red circle", "--model", str(recorded), "--size", "32", "--seed", "5"]

    def drawn(*flags) -> torch.Tensor:
        out = tmp_path / f"out{len(flags)}.png"
        assert main([*args, *flags, "-o", str(out)]) == 0
        return _codes_of(out, ck)

    def expected(spec: SamplingSpec) -> torch.Tensor:
        return sampler.generate_codes(["a red circle"], (4, 4), [spec.params(5)])

    assert torch.equal(drawn(), expected(OURS))
    assert json.loads(capsys.readouterr().err.split("sampling: ", 1)[1].splitlines()[0]) == OURS.complete().model_dump()
    assert not torch.equal(expected(OURS), expected(SamplingSpec(prompt_template="{prompt}").over(OURS)))
    assert torch.equal(drawn("--cfg", "1", "--negative-prompt", ""),
                       expected(SamplingSpec(cfg_scale=1.0, negative_prompt="").over(OURS)))


def test_serve_and_eval_take_the_checkpoints_defaults(recorded, tmp_path):
    from simplear.evaluation.config import EvalStageConfig
    from simplear.evaluation.generate import set_key
    from simplear.evaluation.stage import resolve_checkpoints
    from simplear.serving import ServeConfig, build_engine
    from simplear.serving.config import parse_request

    cfg = ServeConfig(engine="torch", sizes=["32x32"], device="cpu")
    _, defaults = build_engine(recorded, cfg)
    assert defaults == OURS.complete()
    _, defaults = build_engine(recorded, cfg.model_copy(update={"sampling": SamplingSpec(cfg_scale=2.0)}))
    assert (defaults.cfg_scale, defaults.negative_prompt) == (2.0, OURS.negative_prompt)
    req, _ = parse_request(json.dumps({"prompt": "a", "guidance_scale": 4.0}).encode(), cfg)
    asked = req.sampling().over(defaults).params(1)
    assert (asked.cfg_scale, asked.negative_prompt, asked.prompt_template) == (4.0, OURS.negative_prompt,
                                                                               OURS.prompt_template)

    sets = [{"name": "p", "source": "list", "items": ["a red circle"], "scorers": [{"kind": "shapes"}]}]
    ctx = SimpleNamespace(needs=[], config_path=lambda v: Path(v))
    plain = EvalStageConfig.model_validate({"prompt_sets": sets, "checkpoints": [{"path": str(recorded), "size": 32}]})
    (ck,) = resolve_checkpoints(ctx, plain, "stages.eval.config")
    assert ck.sampling == OURS.complete()
    over = plain.model_copy(update={"sampling": SamplingSpec(temperature=0)})
    (ck0,) = resolve_checkpoints(ctx, over, "stages.eval.config")
    assert (ck0.sampling.temperature, ck0.sampling.cfg_scale) == (0, 3.0)
    assert set_key(ck, [], ck.sampling, 0, 4, "torch") != set_key(ck0, [], ck0.sampling, 0, 4, "torch")
    assert "sampling" not in plain.model_dump()  # a config that leaves it out fingerprints as before


def test_a_training_stage_records_its_defaults_over_its_inits(recorded):
    """SFT from a checkpoint keeps what that checkpoint records, with the stage's `defaults:` over it; from scratch,
    the built-in ones; the grid draws with them."""
    from simplear.t2i import SequenceSpec, T2ITask

    common = dict(sequence=SequenceSpec(), caption="original", samples=None, grid=(4, 4), seed=0)
    inherited = T2ITask(checkpoint=str(recorded), **common).build(torch.device("cpu"), None)
    assert inherited.sampling == OURS.complete()
    ours = T2ITask(checkpoint=str(recorded), defaults=SamplingSpec(cfg_scale=1.5), **common).build(torch.device("cpu"), None)
    assert (ours.sampling.cfg_scale, ours.sampling.prompt_template) == (1.5, OURS.prompt_template)
    vt = inherited.visual_tokenizer_config
    scratch = T2ITask(visual_tokenizer=vt, **common).build(torch.device("cpu"), None)
    assert scratch.sampling == DEFAULT_SAMPLING
