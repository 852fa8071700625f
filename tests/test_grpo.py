"""The GRPO stage: advantages, log-probs, KL, resume, and the demo's held-out reward rising.

An SFT-like checkpoint is trained here in half a minute by the project's own training loop
(`simplear.train.train_loop`, one process) on tokenized coloured shapes; GRPO then runs as the
real stage: through the workflow engine, in a Ray task, with trl's trainer inside a Ray Train worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from simplear.train import FINAL, TrainConfig, checkpoints_dir

from test_training_helpers import VT, shapes_table

SIZE = 32  # 4 x 4 visual tokens: seconds per GRPO step on 2 cores


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A small SFT-like checkpoint: 150 steps of next-token training on 1,024 tokenized shapes."""
    from simplear.t2i import SequenceSpec, T2ITask
    from simplear.train import LocalSession, export_final, train_loop
    from simplear.visual_tokenizers import VisualTokenizerConfig

    out = tmp_path_factory.mktemp("sft")
    pq.write_table(shapes_table(1024, SIZE, seed=0), out / "data.parquet")
    task = T2ITask(sequence=SequenceSpec(), caption="original", samples=None, grid=(SIZE // 8, SIZE // 8), seed=0,
                   model_init="tiny", visual_tokenizer=VisualTokenizerConfig(**VT))
    cfg = TrainConfig(steps=150, global_batch_size=32, lr=1e-3, warmup_steps=10, checkpoint_every=150, log_every=50, num_threads=2)
    session = LocalSession([out / "data.parquet"], ["caption", "codes"], out / "checkpoints")
    train_loop(task, cfg, session, out)
    export_final(session.checkpoints()[-1], out / FINAL)
    return out / FINAL


def captions(n_images: int = 256, seed: int = 5) -> list[str]:
    return sorted(set(shapes_table(n_images, SIZE, seed=seed)["caption"].to_pylist()))


def make_task(sft: Path, **over):
    from simplear.grpo.config import EvalSpec, GRPOSpec, GRPOTask
    from simplear.model import checkpoint_meta
    from simplear.sampling.spec import SamplingSpec
    from simplear.visual_tokenizers import VisualTokenizerConfig

    prompts = captions()
    vt = over.get("visual_tokenizer") or VisualTokenizerConfig.model_validate(checkpoint_meta(sft)["visual_tokenizer"])
    kw = dict(init_path=str(sft), visual_tokenizer=vt, grid=(SIZE // 8, SIZE // 8), train_prompts=prompts[4:], eval_prompts=prompts[:4],
              rewards=[{"kind": "color_match", "weight": 1.0}], sampling=SamplingSpec(cfg_scale=1.0).complete(),
              defaults=SamplingSpec().complete(), grpo=GRPOSpec(num_generations=4),
              eval=EvalSpec(samples_per_prompt=2), samples=None, max_text_tokens=128)
    kw.update(over)
    return GRPOTask(**kw)


class ScriptedReward:
    """Rewards by prompt: the same for the whole group of one prompt, 0,1,2,.. across the group of another."""

    name = "scripted"

    def __init__(self, constant_prompt: str):
        self.constant_prompt = constant_prompt

    def __call__(self, images, prompts):
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            seen[p] = seen.get(p, -1) + 1
            out.append(0.7 if p == self.constant_prompt else float(seen[p]))
        return out


def scripted_rewards(constant_prompt: str):
    from simplear.rewards import WeightedRewards

    return WeightedRewards([ScriptedReward(constant_prompt)], [1.0])


# -- the trainer, in this process -------------------------------------------------------------


def test_advantages_are_per_group_and_zero_for_equal_rewards(sft, tmp_path):
    from simplear.grpo.trainer import build_trainer

    torch.manual_seed(0)
    task = make_task(sft)
    a, b = task.train_prompts[:2]
    cfg = TrainConfig(steps=1, global_batch_size=8, lr=1e-5)
    trainer = build_trainer(task, cfg, str(tmp_path / "hf"), device="cpu", rewards=scripted_rewards(a))
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": a}] * 4 + [{"prompt": b}] * 4)
    adv = out["advantages"]
    assert torch.equal(adv[:4], torch.zeros(4))  # equal rewards in a group: no signal at all
    rewards_b = torch.tensor([0.0, 1.0, 2.0, 3.0])
    expected = (rewards_b - rewards_b.mean()) / (rewards_b.std() + 1e-4)  # trl: group mean, group std (unbiased)
    assert torch.allclose(adv[4:], expected, atol=1e-5)
    assert out["completion_ids"].shape == (8, 16)
    vocab = trainer.vocab
    assert bool(((out["completion_ids"] >= vocab.visual_offset) & (out["completion_ids"] < vocab.size)).all())


def test_weighted_clip_and_color_match_rewards_score_the_rollouts(sft, tmp_path):
    """Several rewards through trl: each scores the decoded images; the group statistics use their weighted sum."""
    from simplear.grpo.trainer import build_trainer
    from test_rewards import TINY_CLIP

    clip_cfg = tmp_path / "simplear-grpo-tiny-clip.json"
    clip_cfg.write_text(json.dumps(TINY_CLIP))
    rewards = [{"kind": "color_match", "weight": 1.0},
               {"kind": "clip", "model": "simplear-grpo-tiny-clip", "pretrained": None, "model_config_file": str(clip_cfg),
                "weight": 0.5}]
    torch.manual_seed(0)
    task = make_task(sft, rewards=rewards)
    trainer = build_trainer(task, TrainConfig(steps=1, global_batch_size=8, lr=1e-5), str(tmp_path / "hf"), device="cpu")
    assert trainer.reward_func_names == ["color_match", "clip"]
    assert trainer.reward_weights.tolist() == [1.0, 0.5]
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": p} for p in task.train_prompts[:2] for _ in range(4)])
    m = trainer._metrics["train"]
    assert 0 <= m["rewards/color_match/mean"][0] <= 1 and -1 <= m["rewards/clip/mean"][0] <= 1
    assert m["reward"][0] == pytest.approx(m["rewards/color_match/mean"][0] + 0.5 * m["rewards/clip/mean"][0], abs=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_trainer_log_probs_are_the_samplers(sft, tmp_path, cfg_scale):
    """The policy's per-token log-probs over the sampled visual tokens equal what the sampler drew them with
    (visual ids only, CFG-combined, tempered), so the first importance ratio is 1 and the first KL is 0."""
    from simplear.grpo.trainer import build_trainer
    from simplear.sampling.spec import SamplingSpec

    torch.manual_seed(0)
    task = make_task(sft, sampling=SamplingSpec(cfg_scale=cfg_scale, temperature=0.8, negative_prompt="a dark plain background",
                                                prompt_template="a photo of {prompt}").complete())
    trainer = build_trainer(task, TrainConfig(steps=1, global_batch_size=8, lr=1e-5), str(tmp_path / "hf"), device="cpu")
    prompts = [p for p in task.train_prompts[:2] for _ in range(4)]
    rollout = trainer._rollout(prompts, trainer)
    assert len(rollout["decoded_images"]) == 8 and rollout["decoded_images"][0].shape == (3, SIZE, SIZE)
    from trl.trainer.utils import pad

    prompt_ids = pad([torch.tensor(p) for p in rollout["prompt_ids"]], padding_value=trainer.vocab.pad_id, padding_side="left")
    prompt_mask = pad([torch.ones(len(p), dtype=torch.long) for p in rollout["prompt_ids"]], padding_value=0, padding_side="left")
    completion = torch.tensor(rollout["completion_ids"])
    ids = torch.cat([prompt_ids, completion], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        policy, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, completion.size(1),
                                                                        batch_size=3, compute_entropy=True)
        reference, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, completion.size(1))
    sampled = torch.tensor(rollout["logprobs"])
    assert torch.allclose(policy, sampled, atol=1e-4), (policy - sampled).abs().max()
    kl = torch.exp(reference - policy) - (reference - policy) - 1
    assert kl.abs().max() < 1e-6
    assert entropy.shape == policy.shape and bool((entropy > 0).all())


# -- the stage, through the engine on Ray -------------------------------------------------------


def grpo_workflow(tmp_path: Path, sft: Path, **grpo_config) -> Path:
    config = {
        "init": str(sft),
        "size": SIZE,
        "prompts": {"source": "stage", "stage": "shapes", "eval_count": 16, "seed": 0},
        "rewards": [{"kind": "color_match", "weight": 1.0}],
        "sampling": {"cfg_scale": 1.0, "temperature": 1.0},
        "grpo": {"num_generations": 8, "beta": 0.04, "epsilon": 0.2},
        "train": {"steps": 30, "global_batch_size": 64, "lr": 1e-4, "checkpoint_every": 15, "report_interval_s": 2.0,
                  "num_threads": 2, "seed": 0},
        "eval": {"samples_per_prompt": 8, "seed": 1000},
        "samples": {"prompts": ["a red circle on a blue background", "a white square on a green background"], "per_prompt": 2,
                    "sampling": {"cfg_scale": 1.0}},
    }
    for key, value in grpo_config.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    wf = {
        "run_dir": str(tmp_path / "run"),
        "plugins": ["test_training_helpers"],
        "stages": {
            "shapes": {"uses": "test_shapes_tokens", "config": {"counts": {SIZE: 512}, "shards": 2, "seed": 7}},
            "grpo": {"uses": "grpo", "needs": ["shapes"], "config": config, "resources": {"cpus": 1}},
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return path


def run(path: Path):
    from simplear.workflow.engine import run_workflow, select
    from simplear.workflow.spec import load_workflow

    wf = load_workflow(path)
    return run_workflow(wf, select(wf))


def test_demo_grpo_raises_held_out_color_match(ray_session, sft, tmp_path):
    """30 GRPO steps (8 prompts x 8 images each): the held-out mean color_match of the policy beats the SFT
    model's on the same prompts and seeds by many standard errors of the paired difference."""
    statuses = run(grpo_workflow(tmp_path, sft, eval={"scorers": [{"kind": "shapes"}], "cfg_scales": [2.0]}))
    stage_dir = tmp_path / "run" / "grpo"
    manifest = statuses["grpo"].manifest
    assert statuses["grpo"].state == "done"
    for name in ("final/model.safetensors", "final/simplear.json", "metrics.jsonl", "reward_curve.png", "eval.json",
                 "samples.png", "samples_before.png"):
        assert (stage_dir / name).is_file(), name
    assert not (stage_dir / "final" / "optimizer.pt").exists()
    assert list((stage_dir / "tensorboard").iterdir())

    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("reward_mean", "reward_std", "kl", "clip_fraction", "reward_color_match_mean", "loss", "lr", "entropy"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy starts as the reference
    assert max(r["kl"] for r in rows) > 0

    comparison = json.loads((stage_dir / "eval.json").read_text())["comparison"]["color_match"]
    print("held-out color_match: SFT %.4f -> GRPO %.4f (+%.4f, se %.4f, z %.1f)" % (
        comparison["before"], comparison["after"], comparison["improvement"], comparison["improvement_se"], comparison["z"]))
    assert comparison["prompts"] == 16
    assert comparison["after"] > comparison["before"] + 0.03
    assert comparison["z"] > 3, comparison  # a paired difference noise cannot explain
    m = manifest["metrics"]
    assert m["eval_color_match_before"] == comparison["before"] and m["eval_color_match_after"] == comparison["after"]
    assert m["steps"] == 30 and m["resumed_at"] == []
    evaluation = json.loads((stage_dir / "eval.json").read_text())
    # the eval stage's demo scorer, not trained on: reported whatever it shows, with its two figures apart
    shape = evaluation["comparison"]["shapes.shape_correct"]
    assert shape["prompts"] == 16 and 0 <= shape["before"] <= 1 and 0 <= shape["after"] <= 1
    assert m["eval_shapes.shape_correct_after"] == shape["after"]
    assert not {k.split("/")[1] for r in rows for k in r if k.startswith("rewards/")} & {"shapes", "shape_match"}
    at_serving = evaluation["comparison_at_cfg"]["2"]
    assert set(at_serving) == {"color_match", "shapes", "shapes.colour_attribution", "shapes.shape_correct", "total"}
    assert at_serving["total"]["prompts"] == 16
    assert m["eval_color_match_cfg2_after"] == at_serving["color_match"]["after"]
    print("held-out shape correctness %s; at CFG 2: %s" % (shape, at_serving["color_match"]))

    from simplear.model import load_checkpoint

    ck = load_checkpoint(stage_dir / "final")
    assert ck.extra["trainer_state"]["step"] == 30 and ck.vocab.codebook_size == 1000


def test_resume_continues_from_the_checkpoint_like_an_uninterrupted_run(ray_session, sft, tmp_path):
    """The stage run to step 2 (its checkpoint reported), then rerun to step 4 on the same folder, resumes at
    step 2 and ends with the weights of an uninterrupted 4-step run: weights, optimizer, scheduler, data order
    and draws all resume. (The engine resets a folder whose config changed, so the stage is called directly.)
    A rerun after the last checkpoint only evaluates."""
    from simplear.model import load_checkpoint
    from simplear.workflow.context import StageContext
    from simplear.workflow.engine import run_workflow, select
    from simplear.workflow.spec import load_workflow
    from simplear.grpo.stage import make_task
    from simplear.grpo.trainer import build_trainer
    from stages.grpo import run as run_grpo

    small = dict(grpo={"num_generations": 4}, train={"steps": 4, "global_batch_size": 8, "checkpoint_every": 2, "lr": 3e-4},
                 eval={"samples_per_prompt": 1}, prompts={"eval_count": 2}, samples=None)
    wf = load_workflow(grpo_workflow(tmp_path, sft, **small))
    run_workflow(wf, select(wf, only="shapes"))
    stage, stage_dir = wf.stages["grpo"], wf.stage_dir("grpo")
    stage_dir.mkdir(parents=True)
    ctx = StageContext(name="grpo", kind="grpo", config=stage.config, resources=stage.resources, stage_dir=stage_dir,
                       run_dir=wf.run_dir, needs=["shapes"], fingerprint="test", dataset_files={}, workflow_path=wf.path,
                       profile="")
    to_2 = stage.config.model_copy(update={"train": stage.config.train.model_copy(update={"steps": 2})})
    first = run_grpo(StageContext(**{**ctx.__dict__, "config": to_2}))
    assert first.metrics["steps"] == 2 and first.metrics["resumed_at"] == []
    assert sorted(p.name for p in checkpoints_dir(stage_dir).glob("checkpoint-*")) == ["checkpoint-00000002"]
    second = run_grpo(ctx)
    assert second.metrics["steps"] == 4 and second.metrics["resumed_at"] == [2]
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    resumed = load_checkpoint(stage_dir / FINAL)
    assert resumed.extra["trainer_state"]["resumed_at"] == [2]
    # killed after its last checkpoint (during the evaluation): a rerun trains nothing more and evaluates again
    (stage_dir / "eval.json").unlink()
    third = run_grpo(ctx)
    assert third.metrics["steps"] == 4 and (stage_dir / "eval.json").is_file()
    assert len((stage_dir / "metrics.jsonl").read_text().splitlines()) == 4

    # the same 4 steps without a stop, in this process
    torch.set_num_threads(stage.config.train.num_threads)
    trainer = build_trainer(make_task(ctx, stage.config), stage.config.train, str(tmp_path / "hf"), device="cpu")
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert [r["reward_mean"] for r in rows] == pytest.approx(rewards, abs=1e-6)
    start = load_checkpoint(sft).model.state_dict()
    expected = trainer.model.state_dict()
    got = resumed.model.state_dict()
    assert any(not torch.equal(expected[k], start[k]) for k in expected)  # training moved the weights
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k


def test_a_checkpoint_stages_trls_optimizer_state_once(sft, tmp_path):
    """trl's save and our checkpoint folder share the node's staging dir: its resume files are moved into ours, so
    the optimizer state (twice the weights with AdamW) is on the staging disk once, not twice."""
    from simplear.grpo.reporting import HF_STATE, checkpoint_folder
    from simplear.model import load_checkpoint

    ck = load_checkpoint(sft)
    hf = tmp_path / "checkpoint-2"
    hf.mkdir()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (hf / name).write_bytes(name.encode() * 1000)
    (hf / "trainer_state.json").write_text("{}")
    checkpoint_folder(hf, tmp_path / "ours", ck.model, ck.vocab, ck.visual_tokenizer_config, {"step": 2}, {}, ck.sampling)
    assert (tmp_path / "ours" / "optimizer.pt").read_bytes() == b"optimizer.pt" * 1000 and (tmp_path / "ours" / HF_STATE).exists()
    assert sorted(p.name for p in hf.iterdir()) == ["trainer_state.json"]  # moved, not copied
    assert load_checkpoint(tmp_path / "ours").extra["trainer_state"] == {"step": 2}


# -- configuration ------------------------------------------------------------------------------


def test_config_rules(tmp_path):
    from pydantic import ValidationError

    from simplear.grpo.config import GRPOStageConfig, PromptSpec

    base = {"size": 32, "prompts": {"source": "list", "items": ["a", "b"]}, "rewards": [{"kind": "color_match"}],
            "train": {"steps": 1, "global_batch_size": 8, "lr": 1e-6}}
    cfg = GRPOStageConfig.model_validate(base)
    assert cfg.grpo.num_generations == 4 and cfg.grpo.beta == 0.04 and cfg.grpo.epsilon == 0.2
    with pytest.raises(ValidationError, match="multiple of grpo.num_generations"):
        GRPOStageConfig.model_validate({**base, "train": {**base["train"], "global_batch_size": 6}})
    with pytest.raises(ValidationError, match="num_generations"):
        GRPOStageConfig.model_validate({**base, "grpo": {"num_generations": 1}})
    with pytest.raises(ValidationError, match="needs `stage`"):
        PromptSpec(source="stage")
    with pytest.raises(ValidationError):
        GRPOStageConfig.model_validate({**base, "rewards": []})
    with pytest.raises(ValidationError, match="extra|Extra"):
        GRPOStageConfig.model_validate({**base, "grpo": {"bta": 0.1}})
    # train: keys that would do nothing in GRPO are refused, not ignored
    with pytest.raises(ValidationError, match="train.shuffle_buffer: GRPO reads no data rows"):
        GRPOStageConfig.model_validate({**base, "train": {**base["train"], "shuffle_buffer": 64}})
    with pytest.raises(ValidationError, match="linear schedule decays to 0"):
        GRPOStageConfig.model_validate({**base, "train": {**base["train"], "lr_schedule": "linear", "min_lr_ratio": 0.1}})
    with pytest.raises(ValidationError, match="DDP only"):
        GRPOStageConfig.model_validate({**base, "train": {**base["train"], "strategy": "fsdp"}})


def test_rollout_seeds_are_distinct_and_repeatable():
    from simplear.grpo.rollout import rollout_seed

    seeds = {rollout_seed(0, step, rank, i) for step in range(20) for rank in range(4) for i in range(28)}
    assert len(seeds) == 20 * 4 * 28
    assert rollout_seed(3, 5, 1, 2) == rollout_seed(3, 5, 1, 2)


def test_prompts_come_from_the_kept_parts_of_the_chosen_resolution(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines_support import stage_context
    from simplear.storage.local import LocalStore
    from simplear.workflow.manifest import atomic_write_json, describe_outputs
    from simplear.grpo.config import PromptSpec
    from simplear.grpo.prompts import resolve_prompts

    stage = tmp_path / "tokenize"
    for folder, captions in (("64", [f"small {i}" for i in range(5)]), ("128", [f"big {i}" for i in range(6)])):
        (stage / folder).mkdir(parents=True)
        pq.write_table(pa.table({"key": captions, "caption": captions}), stage / folder / "part-0.parquet")
    (stage / "rejected").mkdir()
    pq.write_table(pa.table({"key": ["x"], "reason": ["encode_error"]}), stage / "rejected/part-0.parquet")  # no caption
    atomic_write_json(stage / "_MANIFEST.json", {"fingerprint": "t", "outputs": describe_outputs(LocalStore(stage.parent), stage.name)})
    ctx = stage_context(tmp_path, "grpo", "grpo", None, ["tokenize"])
    train, held_out = resolve_prompts(ctx, PromptSpec(stage="tokenize", resolution=128, eval_count=2), "stages.grpo.config")
    assert sorted(train + held_out) == [f"big {i}" for i in range(6)] and len(held_out) == 2
    everything = resolve_prompts(ctx, PromptSpec(stage="tokenize", eval_count=2), "w")  # rejected/ skipped, not an error
    assert len(everything[0]) + len(everything[1]) == 11


def test_several_iterations_per_generation_move_the_ratio_and_clip(sft, tmp_path):
    """num_iterations 2: the second pass over a generation uses the old policy's log-probs kept from the
    first, the ratio leaves 1, and with a small epsilon some tokens are clipped; entropy carries no graph."""
    from simplear.grpo.config import GRPOSpec
    from simplear.grpo.logps import visual_logps
    from simplear.grpo.trainer import build_trainer

    torch.manual_seed(0)
    task = make_task(sft, grpo=GRPOSpec(num_generations=4, num_iterations=2, epsilon=0.01, beta=0.0))
    trainer = build_trainer(task, TrainConfig(steps=4, global_batch_size=8, lr=5e-3), str(tmp_path / "hf"), device="cpu")
    trainer.train()
    clipped = [r["clip_ratio/region_mean"] for r in trainer.state.log_history if "clip_ratio/region_mean" in r]
    assert len(clipped) == 4 and max(clipped) > 0, clipped
    ids = torch.tensor([[trainer.vocab.t2i_id, trainer.vocab.soi_id] + [trainer.vocab.visual_offset] * 4])
    lp, ent = visual_logps(trainer.model, ids, torch.ones_like(ids), 4, trainer.vocab, trainer.draw, trainer.uncond_ids,
                           compute_entropy=True)
    assert lp.requires_grad and not ent.requires_grad
