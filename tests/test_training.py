"""The shared training loop without Ray: config rules, schedule, batches, loss, resume exactness, SFT's init checks."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from simplear.config import ConfigError
from simplear.t2i import CAPTION_COLUMNS, SequenceSpec, T2ITask
from simplear.train import LocalSession, METRICS, TRAINER_STATE, TrainConfig, lr_at, plot_loss_curve, read_metrics, scaling_config, summarize, train_loop
from simplear.train_data import Position
from simplear.visual_tokenizers import VisualTokenizerConfig
from simplear.workflow.spec import Resources, load_workflow
from test_training_helpers import VT, shapes_table

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=10, global_batch_size=8, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def task(**kw) -> T2ITask:
    base = dict(sequence=SequenceSpec(), caption="original", samples=None, grid=(4, 4), seed=0,
                visual_tokenizer=VisualTokenizerConfig(**VT), model_overrides=SMALL)
    return T2ITask(**{**base, **kw})


# ---- config rules


def test_global_batch_must_split_over_accumulation():
    with pytest.raises(ValueError, match="global_batch_size 10 is not a multiple of grad_accum_steps 4"):
        train_cfg(global_batch_size=10, grad_accum_steps=4)


def test_global_batch_must_split_over_workers():
    cfg = train_cfg(global_batch_size=256, grad_accum_steps=4)
    assert cfg.micro_batch_size(4) == 16
    with pytest.raises(ConfigError, match=r"train.global_batch_size 256 .* x 3 workers \(resources.concurrency\)"):
        cfg.micro_batch_size(3)


def test_warmup_longer_than_run_is_an_error():
    with pytest.raises(ValueError, match="warmup_steps 20 > steps 10"):
        train_cfg(warmup_steps=20)


def test_unknown_training_key_names_its_path(tmp_path):
    wf = tmp_path / "workflow.yaml"
    wf.write_text(
        "stages:\n"
        "  pretrain:\n"
        "    uses: pretrain\n"
        "    config:\n"
        "      data: {stage: tokenize, resolution: 64}\n"
        "      train: {steps: 10, global_batch_size: 8, lr: 1.0e-3, lr_shedule: cosine}\n"
    )
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.config\.train\.lr_shedule: unknown key"):
        load_workflow(wf)


def test_resources_become_the_scaling_config():
    res = Resources(cpus=4, gpus=1, memory="2GiB", concurrency=8)
    sc = scaling_config(res, train_cfg(global_batch_size=256, grad_accum_steps=2))
    assert sc.num_workers == 8 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 4, "GPU": 1, "memory": 2 * 2**30}
    with pytest.raises(ConfigError, match="resources.concurrency"):
        scaling_config(Resources(concurrency=3), train_cfg(global_batch_size=256))


def test_lr_schedules():
    warm = train_cfg(steps=100, warmup_steps=10, lr=1.0)
    assert [lr_at(warm, s) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]  # then constant, as in the paper
    cos = train_cfg(steps=110, warmup_steps=10, lr=1.0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cos, 10) == pytest.approx(1.0)
    assert lr_at(cos, 60) == pytest.approx(0.55)
    assert lr_at(cos, 110) == pytest.approx(0.1)
    lin = train_cfg(steps=10, lr=1.0, lr_schedule="linear")
    assert lr_at(lin, 5) == pytest.approx(0.5)


# ---- batches and loss


def rows_of(table, n):
    sub = table.slice(0, n)
    return {c: sub[c].to_numpy(zero_copy_only=False) for c in sub.column_names}


@pytest.fixture(scope="module")
def small_bundle():
    return task().build(torch.device("cpu"), None)


def test_caption_choice_falls_back_to_the_original(small_bundle):
    rows = rows_of(shapes_table(6, 32, seed=3), 6)
    no_drop = SequenceSpec(cfg_dropout=0.0)
    vocab = small_bundle.vocab
    tok = vocab.text_tokenizer

    def captions(caption):
        batch = task(caption=caption, sequence=no_drop).collate(rows, Position(), 0, small_bundle)
        out = []
        for ids in batch["input_ids"]:
            ids = ids.tolist()
            out.append(tok.decode(ids[ids.index(vocab.t2i_id) + 1: ids.index(vocab.soi_id)]))
        return out

    assert captions("original") == list(rows["caption"])
    assert captions("long") == list(rows["caption_long"])
    assert captions("short") == list(rows["caption"])  # caption_short is empty in this data
    assert set(CAPTION_COLUMNS) == {"original", "long", "short"}


def test_cfg_dropout_depends_on_the_data_position_only(small_bundle):
    rows = rows_of(shapes_table(64, 32, seed=4), 64)
    t = task(sequence=SequenceSpec(cfg_dropout=0.5))
    a = t.collate(rows, Position(2, 7), 0, small_bundle)
    b = t.collate(rows, Position(2, 7), 0, small_bundle)
    c = t.collate(rows, Position(2, 8), 0, small_bundle)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    empty = (a["input_ids"][:, 1] == small_bundle.vocab.soi_id).float().mean().item()  # <|t2i|><|soi|>: caption dropped
    assert 0.25 < empty < 0.75


@pytest.mark.parametrize("image_only", [False, True])
def test_loss_and_image_token_loss(small_bundle, image_only):
    rows = rows_of(shapes_table(8, 32, seed=5), 8)
    t = task(sequence=SequenceSpec(cfg_dropout=0.0, image_loss_only=image_only))
    batch = t.collate(rows, Position(), 0, small_bundle)
    loss, stats = t.loss(small_bundle.model, batch, small_bundle)
    logits = small_bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    V = logits.shape[-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), batch["input_ids"][:, 1:].reshape(-1), reduction="none")
    visual = (batch["input_ids"][:, 1:] >= small_bundle.vocab.visual_offset).reshape(-1)
    assert stats["image_loss_count"].item() == 8 * 16  # every image token is predicted, none of the padding
    assert (stats["image_loss_sum"] / stats["image_loss_count"]).item() == pytest.approx(ce[visual].mean().item(), rel=1e-4)
    if image_only:
        assert loss.item() == pytest.approx(ce[visual].mean().item(), rel=1e-4)
        assert stats["text_loss_count"].item() == 0
    else:
        assert stats["text_loss_count"].item() > 0
        assert loss.item() > 0 and math.isfinite(loss.item())


# ---- the loop: resume is exact


class Crash(RuntimeError):
    pass


class CrashingTask(T2ITask):
    """Dies in the middle of a run, like a killed worker."""

    def __init__(self, crash_after_micro_batches: int, **kw):
        super().__init__(**kw)
        self.left = crash_after_micro_batches

    def loss(self, model, batch, bundle):
        self.left -= 1
        if self.left < 0:
            raise Crash("killed")
        return super().loss(model, batch, bundle)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_killed_run_resumes_to_the_same_weights_and_steps(tmp_path):
    """11 micro-batches per epoch, 2 per step: epochs end inside steps and the resume lands mid-epoch."""
    data = tmp_path / "data.parquet"
    pq.write_table(shapes_table(44, 32, seed=6), data)
    cfg = train_cfg(steps=12, global_batch_size=8, grad_accum_steps=2, warmup_steps=2, checkpoint_every=3,
                    keep_checkpoints=None, shuffle_buffer=16)
    t = task(sequence=SequenceSpec(cfg_dropout=0.3))

    def session(name):
        return LocalSession([data], t.columns, tmp_path / name / "checkpoints", keep=None)

    straight = session("straight")
    train_loop(t, cfg, straight, tmp_path / "straight")

    first = session("killed")
    with pytest.raises(Crash):
        train_loop(CrashingTask(15, **t.__dict__), cfg, first, tmp_path / "killed")  # dies in step 8
    assert [p.name for p in first.checkpoints()] == [f"checkpoint-{s:08d}" for s in (3, 6)]
    again = session("killed")
    train_loop(t, cfg, again, tmp_path / "killed")

    end_a, end_b = straight.checkpoints()[-1], again.checkpoints()[-1]
    assert end_a.name == end_b.name == "checkpoint-00000012"
    state = json.loads((end_b / TRAINER_STATE).read_text())
    assert state["step"] == 12 and state["resumed_at"] == [6]
    positions = state["positions"]
    assert positions == json.loads((end_a / TRAINER_STATE).read_text())["positions"]  # buffer and cursor included
    assert len(positions) == 1 and (positions[0]["epoch"], positions[0]["batch"]) == (2, 2)
    assert len(positions[0]["buffered"]) <= cfg.shuffle_buffer
    wa, wb = weights(end_a), weights(end_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the checkpoint reloads to the weights it saved, and the optimizer state came along
    from simplear.model import load_checkpoint

    ck = load_checkpoint(end_b)
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, wb[k]), k
    assert (end_b / "optimizer.pt").exists() and (end_b / "tokenizer.json").exists() and (end_b / "config.json").exists()
    # metrics: every step once, the rows of the lost steps 7-8 replaced by the resumed run's
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / METRICS).read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert [r["loss"] for r in read_metrics(tmp_path / "killed")] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert list((tmp_path / "killed" / "tensorboard").glob("events.out.tfevents.*"))


def test_summary_and_loss_curve(tmp_path):
    rows = [{"step": s, "loss": 5.0 / s, "image_loss": 6.0 / s, "lr": 1e-3, "tokens_per_s": 100.0 + s} for s in range(1, 101)]
    s = summarize(rows)
    assert s["image_loss_start"] == 6.0  # step 1: the model as it came in
    assert s["image_loss_end"] == pytest.approx(sum(6.0 / i for i in range(91, 101)) / 10, abs=1e-4)
    assert s["last_step"] == 100 and s["tokens_per_s"] == pytest.approx(151.0)
    (tmp_path / "loss_curve.png").write_bytes(plot_loss_curve(rows, title="t"))
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- SFT's init: a wrong or missing checkpoint is a clear error


@pytest.fixture
def sft_ctx(tmp_path):
    from stages.sft import SFTConfig
    from simplear.workflow import StageContext

    def make(init: str):
        cfg = SFTConfig(init=init, data={"stage": "shapes", "resolution": 48}, train=dict(steps=1, global_batch_size=1, lr=1e-3))
        return StageContext(name="sft", kind="sft", config=cfg, resources=Resources(), stage_dir=tmp_path / "run" / "sft",
                            run_dir=tmp_path / "run", needs=["pretrain", "shapes"], fingerprint="x", dataset_files={},
                            workflow_path=tmp_path / "workflow.yaml", profile="")

    return make


def test_sft_init_missing_folder(sft_ctx, tmp_path):
    from simplear.t2i import resolve_init

    with pytest.raises(ConfigError, match=r"stages\.sft\.config\.init: '/no/such/ckpt' is neither a stage this one needs \(pretrain, shapes\)"):
        resolve_init(sft_ctx("/no/such/ckpt"), "/no/such/ckpt", "stages.sft.config")
    with pytest.raises(ConfigError, match="'pretrian' is neither a stage this one needs"):
        resolve_init(sft_ctx("pretrian"), "pretrian", "stages.sft.config")


def test_sft_init_folder_that_is_no_checkpoint(sft_ctx, tmp_path):
    from simplear.t2i import resolve_init

    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"init: not a SimpleAR checkpoint: \S*notackpt .*or a released checkpoint with "
                                          r"`stages.sft.config.visual_tokenizer`"):
        resolve_init(sft_ctx("notackpt"), "notackpt", "stages.sft.config")  # relative: to the workflow's folder


def test_sft_init_stage_without_final_checkpoint(sft_ctx, tmp_path):
    from simplear.t2i import resolve_init
    from simplear.workflow.manifest import MANIFEST

    (tmp_path / "run" / "pretrain").mkdir(parents=True)
    (tmp_path / "run" / "pretrain" / MANIFEST).write_text(json.dumps({"fingerprint": "f", "outputs": [{"path": "x.parquet", "sha256": "0"}]}))
    with pytest.raises(ConfigError, match="stage 'pretrain' recorded no final/ checkpoint"):
        resolve_init(sft_ctx("pretrain"), "pretrain", "stages.sft.config")


def test_sft_init_accepts_a_checkpoint_folder(sft_ctx, tmp_path, small_bundle):
    from simplear.model import save_checkpoint
    from simplear.t2i import resolve_init

    save_checkpoint(tmp_path / "ckpt", small_bundle.model, small_bundle.vocab, small_bundle.visual_tokenizer_config)
    init = resolve_init(sft_ctx(str(tmp_path / "ckpt")), str(tmp_path / "ckpt"), "stages.sft.config")
    assert init.location == str(tmp_path / "ckpt") and init.visual_tokenizer == small_bundle.visual_tokenizer_config


# ---- the shipped workflow


@pytest.mark.parametrize("profile", ["demo", "production"])
def test_shipped_training_stages(profile):
    wf = load_workflow(ROOT / "workflow.yaml", profile)
    pre, sft = wf.stages["pretrain"], wf.stages["sft"]
    assert sft.needs == ["pretrain", "tokenize"] and sft.config.init == "pretrain"
    for stage in (pre, sft):
        stage.config.train.micro_batch_size(stage.resources.concurrency)  # the batch splits over the workers
        assert stage.config.sequence.cfg_dropout == 0.1
    assert pre.config.data.resolution < sft.config.data.resolution  # SFT at the higher resolution
    if profile == "production":  # the paper's values
        assert pre.config.init == "Qwen/Qwen2.5-0.5B-Instruct"
        assert (pre.config.train.lr, sft.config.train.lr) == (1e-4, 2e-5)
        for stage in (pre, sft):
            t = stage.config.train
            assert (t.global_batch_size, t.warmup_steps, t.lr_schedule, t.precision) == (256, 0, "constant", "auto")
            assert stage.resources.gpus == 1 and t.num_threads is None
    else:
        assert pre.config.init == "tiny" and pre.resources.gpus == 0


# ---- on a GPU: bf16 autocast, gradient checkpointing (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_and_gradient_checkpointing_on_gpu(tmp_path):
    data = tmp_path / "data.parquet"
    pq.write_table(shapes_table(64, 32, seed=7), data)
    t = task()
    cfg = train_cfg(steps=6, global_batch_size=16, grad_accum_steps=2, checkpoint_every=3, gradient_checkpointing=True)
    session = LocalSession([data], t.columns, tmp_path / "checkpoints", device="cuda")
    last = train_loop(t, cfg, session, tmp_path)
    assert last["step"] == 6 and math.isfinite(last["loss"])
    w = weights(session.checkpoints()[-1])
    assert all(v.dtype == torch.float32 for v in w.values())  # bf16 compute, fp32 master weights in the checkpoint
    from simplear.train.parallel import autocast_for

    assert autocast_for(cfg, torch.device("cuda"), 1) is not contextlib.nullcontext
