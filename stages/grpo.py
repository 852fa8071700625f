"""GRPO: reinforcement learning on image rewards, with trl's `GRPOTrainer` inside a Ray Train worker.

Generation is overridden (trl's `rollout_func`): the completions of a group are visual tokens drawn by
the project's `TorchSampler` (KV cache, optional CFG, visual ids only), decoded to images by the visual
tokenizer and scored on the images by `simplear.rewards` (weighted, one trl reward function each).
Log-probs, for the policy and for the frozen reference (the KL term), are recomputed over the
sampled visual tokens under the sampler's own distribution: visual ids only, CFG-combined when
`cfg_scale != 1` (the unconditional rows run too), divided by the temperature. So on-policy the
importance ratio is exactly 1 and the KL to the reference is 0 at the first step.

Ray Train runs the worker (`simplear.train.fit`); every `checkpoint_every` steps trl's checkpoint
(optimizer, scheduler, RNG, trainer state) is reported together with a SimpleAR checkpoint of the
policy, so a rerun resumes where a killed one stopped. Per step: reward mean/std (and per reward),
KL, clip fraction, entropy, loss to the log, metrics.jsonl, TensorBoard and `ray.train.report`.
At the end, rank 0 compares the SFT model and the trained policy on held-out prompts (same seeds for
both, so the difference is paired) and writes eval.json; the stage draws reward_curve.png.

Outputs: final/ (the policy), metrics.jsonl, tensorboard/, reward_curve.png, eval.json, samples*.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from simplear.config import ConfigError, StrictModel
from simplear.rewards import RewardConfig, WeightedRewards
from simplear.t2i import SampleSpec, sample_grid, train_progress
from simplear.train import FINAL, METRICS, OPTIMIZER, SAMPLES, TRAINER_STATE, TRAIN_OPERATIONAL, TrainConfig, fit, ray_report, read_metrics
from simplear.train.metrics import MetricsWriter
from simplear.vocab import MAX_TEXT_TOKENS
from simplear.workflow import StageContext, StageResult, register_stage

log = logging.getLogger("simplear.grpo")

REWARD_CURVE = "reward_curve.png"
EVAL = "eval.json"
SAMPLES_BEFORE = "samples_before.png"
HF_STATE = "hf_trainer_state.json"  # trl/transformers' trainer_state.json, renamed beside ours
HF_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth")  # + rng_state_<rank>.pth


# ---------------------------------------------------------------------------------------------
# configuration


class SamplingSpec(StrictModel):
    """How the group's images are drawn. Log-probs are over the untruncated distribution (top-k/top-p
    only restrict the draw), as in the sampler's `return_logprobs`."""

    cfg_scale: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    negative_prompt: str = ""


class PromptSpec(StrictModel):
    """Where prompts come from; `eval_count` distinct ones are held out of training for the evaluation."""

    source: Literal["stage", "file", "list"] = "stage"
    stage: str | None = None  # source "stage": a needed stage whose kept Parquet outputs have `column`
    resolution: int | None = None  # source "stage": only its `<resolution>/` folder (a tokenize stage's); never `rejected/`
    column: str = "caption"
    path: str | None = None  # source "file": a .txt (one prompt a line) or .parquet (`column`); relative to workflow.yaml
    items: list[str] | None = None  # source "list"
    max_prompts: int | None = Field(None, ge=1, description="distinct prompts read at most (the first ones found)")
    eval_count: int = Field(32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        need = {"stage": "stage", "file": "path", "list": "items"}[self.source]
        if not getattr(self, need):
            raise ValueError(f"source {self.source!r} needs `{need}`")
        return self


class GRPOSpec(StrictModel):
    """The algorithm (trl's names). Paper: lr 1e-5, batch 28; reference code: lr 1e-6, 4 generations, beta 0.04, eps 0.2."""

    num_generations: int = Field(4, ge=2, description="group size G: images per prompt")
    beta: float = Field(0.04, ge=0, description="weight of the KL to the frozen reference (the init model)")
    epsilon: float = Field(0.2, gt=0, description="ratio clip")
    epsilon_high: float | None = Field(None, gt=0)
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generated batch (mu)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"


class EvalSpec(StrictModel):
    samples_per_prompt: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 10_000
    sampling: SamplingSpec | None = None  # default: the training sampling
    scorers: list[RewardConfig] = Field([], description="scores reported but not trained on (the `simplear.rewards` "
                                        "interface): shape_match in the demo, clip or hps in production")
    cfg_scales: list[float] = Field([], description="the evaluation again at these CFG scales (the serving one)")


class GRPOStageConfig(StrictModel):
    init: str = "sft"  # a needed stage (its final/ checkpoint) or a checkpoint folder
    size: int | tuple[int, int] = Field(description="image size in pixels (square, or [height, width])")
    prompts: PromptSpec
    rewards: list[RewardConfig] = Field(min_length=1)
    sampling: SamplingSpec = SamplingSpec()
    grpo: GRPOSpec = GRPOSpec()
    train: TrainConfig  # global_batch_size: completions per optimizer step (prompts x num_generations)
    eval: EvalSpec = EvalSpec()
    samples: SampleSpec | None = None
    max_text_tokens: int | None = Field(MAX_TEXT_TOKENS, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.train.global_batch_size % self.grpo.num_generations:
            raise ValueError(f"train.global_batch_size {self.train.global_batch_size} is not a multiple of "
                             f"grpo.num_generations {self.grpo.num_generations} (whole groups per step)")
        if self.train.strategy != "ddp":
            raise ValueError("train.strategy: the GRPO stage runs trl's trainer with DDP only")
        return self


# ---------------------------------------------------------------------------------------------
# what every worker needs: plain data, pickled by Ray Train


@dataclass
class GRPOTask:
    init_path: str
    grid: tuple[int, int]
    train_prompts: list[str]
    eval_prompts: list[str]
    rewards: list[dict]
    sampling: SamplingSpec
    grpo: GRPOSpec
    eval: EvalSpec
    samples: SampleSpec | None
    max_text_tokens: int | None
    stage: str = "grpo"


def rollout_seed(seed: int, step: int, rank: int, index: int) -> int:
    """Per image: the same draws after a resume, distinct across steps, workers and the group."""
    return zlib.crc32(f"grpo/{seed}/{step}/{rank}/{index}".encode())


# ---------------------------------------------------------------------------------------------
# log-probs over the visual ids, as the sampler draws them


def install_visual_head(model, vocab) -> None:
    """`model(input_ids, attention_mask, position_ids, visual_head=T)` -> logits (B, T, codebook) of the last T
    tokens over the visual rows of the LM head only. Patched onto the instance, so DDP's forward hooks run."""
    inner = model.forward
    vo, K = vocab.visual_offset, vocab.codebook_size

    def forward(self, *args, visual_head: int | None = None, **kwargs):
        if visual_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, -visual_head - 1: -1]
        head = self.get_output_embeddings()
        logits = hidden @ head.weight[vo: vo + K].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[vo: vo + K]
        return logits.float()

    model.forward = types.MethodType(forward, model)


def visual_logps(model, input_ids, attention_mask, n_completion: int, vocab, sampling: SamplingSpec,
                 uncond_ids: list[int], compute_entropy: bool = False):
    """Per-token log-probs (B, T) of the completion's visual tokens under the sampler's distribution, and entropies."""
    import torch
    import torch.nn.functional as F

    B = input_ids.size(0)
    completion = input_ids[:, -n_completion:]
    rows, mask = input_ids, attention_mask
    cfg = sampling.cfg_scale != 1.0
    if cfg:  # unconditional rows: the negative prompt followed by the same completion
        u = torch.tensor(uncond_ids, dtype=input_ids.dtype, device=input_ids.device).expand(B, -1)
        u_rows = torch.cat([u, completion], 1)
        u_mask = torch.cat([torch.ones_like(u), attention_mask[:, -n_completion:]], 1)
        L = max(rows.size(1), u_rows.size(1))
        pad = lambda t, v: F.pad(t, (L - t.size(1), 0), value=v)  # noqa: E731  (left padding)
        rows = torch.cat([pad(rows, vocab.pad_id), pad(u_rows, vocab.pad_id)])
        mask = torch.cat([pad(mask, 0), pad(u_mask, 0)])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits_BTK = model(input_ids=rows, attention_mask=mask, position_ids=position_ids, visual_head=n_completion)
    if cfg:
        logp = F.log_softmax(logits_BTK, -1)
        c, u = logp[:B], logp[B:]
        logits_BTK = u + sampling.cfg_scale * (c - u)
    # = the sampler's log_softmax(log_softmax(combined) / T): normalising first only shifts by a constant
    final = F.log_softmax(logits_BTK / sampling.temperature, -1)
    codes = completion - vocab.visual_offset
    valid = (codes >= 0) & (codes < vocab.codebook_size)
    token_logp = final.gather(-1, codes.clamp(0, vocab.codebook_size - 1).unsqueeze(-1)).squeeze(-1) * valid
    entropy = None
    if compute_entropy:  # logged only: no graph for it (it would keep a (B, T, codebook) tensor for backward)
        with torch.no_grad():
            detached = final.detach()
            entropy = -(detached.exp() * detached).sum(-1)
    return token_logp, entropy


# ---------------------------------------------------------------------------------------------
# trl's trainer with visual generation


def _trainer_class():
    from trl import GRPOTrainer

    class VisualGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose completions are images: sampled, decoded and scored by the project's code."""

        def __init__(self, *args, vocab, visual_tokenizer, grid, sampling: SamplingSpec, sampling_seed: int,
                     max_text_tokens: int | None = None, **kwargs):
            self.vocab, self.visual_tokenizer, self.grid = vocab, visual_tokenizer, tuple(grid)
            self.sampling, self.sampling_seed, self.max_text_tokens = sampling, sampling_seed, max_text_tokens
            self.uncond_ids = vocab.prompt_ids(sampling.negative_prompt, max_text_tokens)
            super().__init__(*args, rollout_func=self._rollout, **kwargs)
            for m in (self.model, self.ref_model):
                if m is not None:
                    install_visual_head(self.accelerator.unwrap_model(m), vocab)

        def _rollout(self, prompts: list[str], trainer) -> dict[str, list]:
            import torch

            from simplear.sampler import SamplingParams, TorchSampler

            s = self.sampling
            model = self.accelerator.unwrap_model(self.model)
            sampler = TorchSampler(model, self.vocab, max_text_tokens=self.max_text_tokens)
            step, rank = self.state.global_step, self.accelerator.process_index
            params = [SamplingParams(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                     negative_prompt=s.negative_prompt, seed=rollout_seed(self.sampling_seed, step, rank, i))
                      for i in range(len(prompts))]
            with self.accelerator.autocast():
                codes, logps = sampler.generate_codes(list(prompts), self.grid, params, return_logprobs=True)
            images = self.visual_tokenizer.decode(codes).float().cpu()
            return {
                "prompt_ids": [self.vocab.prompt_ids(p, self.max_text_tokens) for p in prompts],
                "completion_ids": self.vocab.codes_to_ids(codes.reshape(len(prompts), -1)).tolist(),
                "logprobs": logps.tolist(),
                "decoded_images": list(images),
            }

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                               compute_entropy=False, compute_aux_loss=False, **_unused):
            import torch

            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for i in range(0, input_ids.size(0), batch_size):
                with self.accelerator.autocast():
                    lp, ent = visual_logps(model, input_ids[i: i + batch_size], attention_mask[i: i + batch_size],
                                           logits_to_keep, self.vocab, self.sampling, self.uncond_ids, compute_entropy)
                logps.append(lp)
                entropies.append(ent)
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    return VisualGRPOTrainer


def trl_reward_functions(rewards: WeightedRewards) -> list:
    """One trl reward function per reward; each scores the rollout's decoded images against the prompts."""
    import torch

    def make(name, reward):
        def fn(prompts, completions, completion_ids, decoded_images, **_):
            return reward(torch.stack(list(decoded_images)), list(prompts))

        fn.__name__ = name
        return fn

    return [make(n, r) for n, r in zip(rewards.names, rewards.rewards)]


def _use_bf16(cfg: TrainConfig, use_cpu: bool) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and not use_cpu)


def _visual_tokenizer(vt_config, device):
    """The decoder on the worker's device (Cosmos runs there; the pixel tokenizer is plain tensor code)."""
    from simplear.visual_tokenizers import load_visual_tokenizer

    if vt_config.kind == "cosmos":
        vt_config = vt_config.model_copy(update={"device": str(device)})
    return load_visual_tokenizer(vt_config)


def grpo_arguments(task: GRPOTask, cfg: TrainConfig, output_dir: str, world_size: int, use_cpu: bool, **overrides):
    from trl import GRPOConfig

    bf16 = _use_bf16(cfg, use_cpu)
    schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine_with_min_lr"}[cfg.lr_schedule]
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.micro_batch_size(world_size),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_schedule == "cosine" else None,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_epsilon=cfg.eps,
        max_grad_norm=cfg.grad_clip or 0.0,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=bf16,
        use_cpu=use_cpu,
        seed=cfg.seed,
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        # GRPO
        num_generations=task.grpo.num_generations,
        max_completion_length=task.grid[0] * task.grid[1],
        temperature=task.sampling.temperature,
        beta=task.grpo.beta,
        epsilon=task.grpo.epsilon,
        epsilon_high=task.grpo.epsilon_high,
        num_iterations=task.grpo.num_iterations,
        loss_type=task.grpo.loss_type,
        scale_rewards=task.grpo.scale_rewards,
        mask_truncated_completions=False,  # images have no end token: every completion is "truncated"
        disable_dropout=True,
        shuffle_dataset=True,
        remove_unused_columns=False,
        log_completions=False,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def build_trainer(task: GRPOTask, cfg: TrainConfig, output_dir: str, *, world_size: int = 1, device=None,
                  rewards: WeightedRewards | None = None, callbacks=(), **arg_overrides):
    """The trainer, its model loaded from `task.init_path` (also the frozen reference when beta > 0)."""
    import torch
    from datasets import Dataset

    from simplear.model import load_checkpoint

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = load_checkpoint(task.init_path, dtype=torch.float32)
    rewards = rewards or WeightedRewards.from_configs(task.rewards)
    args = grpo_arguments(task, cfg, output_dir, world_size, use_cpu=device.type == "cpu", reward_weights=rewards.weights,
                          **arg_overrides)
    cls = _trainer_class()
    trainer = cls(
        model=ck.model,
        reward_funcs=trl_reward_functions(rewards),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": task.train_prompts}),
        processing_class=ck.vocab.text_tokenizer,
        callbacks=list(callbacks),
        vocab=ck.vocab,
        visual_tokenizer=_visual_tokenizer(ck.visual_tokenizer_config, device),
        grid=task.grid,
        sampling=task.sampling,
        sampling_seed=cfg.seed,
        max_text_tokens=task.max_text_tokens,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its dict per step duplicates our log line
    trainer.simplear_rewards = rewards
    trainer.simplear_vt_config = ck.visual_tokenizer_config
    return trainer


# ---------------------------------------------------------------------------------------------
# checkpoints: trl's resume state + a SimpleAR checkpoint of the policy, in one folder


def checkpoint_folder(hf_checkpoint: Path, dest: Path, model, vocab, vt_config, state: dict, extra: dict) -> None:
    """A loadable SimpleAR checkpoint (HF layout, simplear.json) with trl's optimizer/scheduler/RNG files and
    its trainer state (as hf_trainer_state.json); our trainer_state.json holds step and resumes."""
    from simplear.model import save_checkpoint

    dest.mkdir(parents=True)
    for f in hf_checkpoint.iterdir():
        if f.name in HF_FILES or f.name.startswith("rng_state"):
            shutil.copy2(f, dest / f.name)
    shutil.copy2(hf_checkpoint / "trainer_state.json", dest / HF_STATE)
    save_checkpoint(dest, model, vocab, vt_config, extra={"trainer_state": state, **extra})
    (dest / TRAINER_STATE).write_text(json.dumps(state, indent=2))


@contextlib.contextmanager
def hf_resume_view(checkpoint_dir: Path | None):
    """The folder trl resumes from: our checkpoint's files, with its own trainer_state.json put back."""
    if checkpoint_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="simplear-grpo-resume-") as tmp:
        view = Path(tmp)
        for f in checkpoint_dir.iterdir():
            if f.name not in (TRAINER_STATE, HF_STATE):
                os.symlink(f.resolve(), view / f.name)
        os.symlink((checkpoint_dir / HF_STATE).resolve(), view / "trainer_state.json")
        yield str(view)


def _report_callback(task: GRPOTask, cfg: TrainConfig, out_dir: Path, rank: int, resumed_at: list[int], report, device):
    """transformers callback: metrics rows (rank 0), ray.train.report, checkpoints on trl's saves."""
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None  # set once the trainer exists: on_save needs its vocabulary and tokenizer config
            self.writer = None
            self.last: dict[str, Any] = {}
            self.t_last = self.t_report = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.t_last = self.t_report = time.perf_counter()
            if rank == 0:
                self.writer = MetricsWriter(out_dir, state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or "train_runtime" in logs:  # not a training step's line (e.g. the summary)
                return
            now = time.perf_counter()
            row = step_metrics(state.global_step, logs, now - self.t_last)
            self.t_last = now
            self.last = row
            if self.writer:
                self.writer.write(row)
                nan = float("nan")  # steps that reuse a generation (num_iterations > 1) have no new rewards
                log.info("step %d/%d reward %.4f±%.4f kl %.5f clip %.3f loss %.4f lr %.2e", row["step"], cfg.steps,
                         row.get("reward_mean", nan), row.get("reward_std", nan), row.get("kl", 0.0),
                         row.get("clip_fraction", 0.0), row.get("loss", nan), row.get("lr", 0.0))
            step = state.global_step
            saving = step % cfg.checkpoint_every == 0 or step >= state.max_steps
            if not saving and self._report_due(now):
                report(row)

        def _report_due(self, now: float) -> bool:
            """Rank 0's clock decides (every worker must report on the same steps), at most every report_interval_s."""
            import torch
            import torch.distributed as dist

            due = torch.tensor([float(rank == 0 and now - self.t_report >= cfg.report_interval_s)], device=device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(due, src=0)
            if due.item():
                self.t_report = now
            return bool(due.item())

        def on_save(self, args, state, control, model=None, **kw):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            step = state.global_step
            hf_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            metrics = self.last or {"step": step}
            if rank != 0:
                report(metrics)
                return
            name = f"checkpoint-{step:08d}"
            ours = {"step": step, "resumed_at": resumed_at, "world_size": args.world_size, "stage": task.stage}
            with tempfile.TemporaryDirectory(prefix="simplear-grpo-ckpt-") as tmp:
                d = Path(tmp) / name
                checkpoint_folder(hf_dir, d, model, self.trainer.vocab, self.trainer.simplear_vt_config, ours,
                                  {"train": cfg.model_dump(mode="json"), "grpo": task.grpo.model_dump(mode="json"),
                                   "sampling": task.sampling.model_dump(mode="json"), "init": task.init_path})
                report(metrics, d, name)
            shutil.rmtree(hf_dir, ignore_errors=True)  # reported: Ray Train's copy is the one kept

        def on_train_end(self, args, state, control, **kw):
            if self.writer:
                self.writer.close()

    return ReportCallback()


def step_metrics(step: int, logs: dict, seconds: float) -> dict:
    """trl's log line, renamed: reward_mean/std, kl, clip_fraction, per-reward means, loss, lr."""
    rename = {"reward": "reward_mean", "reward_std": "reward_std", "kl": "kl", "clip_ratio/region_mean": "clip_fraction",
              "entropy": "entropy", "loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm",
              "frac_reward_zero_std": "frac_reward_zero_std", "step_time": "train_step_s"}
    row: dict[str, Any] = {"step": step}
    for k, v in logs.items():
        if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            continue
        if k in rename:
            row[rename[k]] = float(v)
        elif k.startswith("rewards/") and k.count("/") == 2:
            _, name, stat = k.split("/")
            row[f"reward_{name}_{stat}"] = float(v)
    row["step_s"] = round(seconds, 4)
    return row


# ---------------------------------------------------------------------------------------------
# held-out evaluation: SFT model vs trained policy, same prompts and seeds


def sample_and_score(model, vocab, visual_tokenizer, rewards: WeightedRewards, prompts: list[str], grid, sampling: SamplingSpec,
                     per_prompt: int, seed: int, batch_size: int, max_text_tokens=None, autocast=contextlib.nullcontext,
                     scorers: WeightedRewards | None = None) -> dict:
    """Per reward (and "total", their weighted sum) and per extra scorer: the mean score of each prompt over its samples."""
    import torch

    from simplear.sampler import SamplingParams, TorchSampler

    sampler = TorchSampler(model, vocab, max_text_tokens=max_text_tokens)
    requests = [(p, seed + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]
    scores: dict[str, list] = {}
    for b in range(0, len(requests), batch_size):
        chunk = requests[b: b + batch_size]
        params = [SamplingParams(cfg_scale=sampling.cfg_scale, temperature=sampling.temperature, top_k=sampling.top_k,
                                 top_p=sampling.top_p, negative_prompt=sampling.negative_prompt, seed=s) for _, s in chunk]
        with autocast():
            codes = sampler.generate_codes([p for p, _ in chunk], grid, params)
        images = visual_tokenizer.decode(codes).float().cpu()
        texts = [p for p, _ in chunk]
        got = rewards.score(images, texts)
        if scorers is not None:  # named apart from the trained rewards when they share a kind
            got.update({(n if n not in got else f"{n}_eval"): v for n, v in scorers.score(images, texts).items() if n != "total"})
        for name, values in got.items():
            scores.setdefault(name, []).extend(values)
    out = {}
    for name, values in scores.items():
        per_prompt_means = []
        for i in range(len(prompts)):
            vals = [v for v in values[i * per_prompt: (i + 1) * per_prompt] if v is not None]
            per_prompt_means.append(statistics.fmean(vals) if vals else None)
        out[name] = per_prompt_means
    return out


def paired_comparison(before: list, after: list) -> dict:
    """Mean of each, and of the per-prompt difference with its standard error and z = mean / se."""
    pairs = [(b, a) for b, a in zip(before, after) if b is not None and a is not None]
    if not pairs:
        return {}
    d = [a - b for b, a in pairs]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    mean_d = statistics.fmean(d)
    return {
        "before": round(statistics.fmean(b for b, _ in pairs), 5),
        "after": round(statistics.fmean(a for _, a in pairs), 5),
        "improvement": round(mean_d, 5),
        "improvement_se": round(se, 5),
        "z": round(mean_d / se, 2) if se and math.isfinite(se) and se > 0 else (math.inf if mean_d > 0 else 0.0),
        "prompts": len(pairs),
    }


def evaluate_before_after(task: GRPOTask, policy, vocab, visual_tokenizer, vt_config, rewards: WeightedRewards,
                          out_dir: Path, device, autocast=contextlib.nullcontext) -> dict:
    """Rank 0 after training: held-out prompts through the init model and the policy; eval.json and sample grids."""
    import torch

    from simplear.model import load_checkpoint
    from simplear.workflow.manifest import atomic_path, atomic_write_json

    spec = task.eval
    sampling = spec.sampling or task.sampling
    before_model = load_checkpoint(task.init_path, device=device, dtype=torch.float32).model
    scorers = WeightedRewards.from_configs(spec.scorers) if spec.scorers else None
    common = dict(vocab=vocab, visual_tokenizer=visual_tokenizer, rewards=rewards, scorers=scorers,
                  prompts=task.eval_prompts, grid=task.grid, per_prompt=spec.samples_per_prompt,
                  seed=spec.seed, batch_size=spec.batch_size, max_text_tokens=task.max_text_tokens, autocast=autocast)
    t0 = time.perf_counter()
    before = sample_and_score(before_model, sampling=sampling, **common)
    after = sample_and_score(policy, sampling=sampling, **common)
    comparison = {name: paired_comparison(before[name], after[name]) for name in before}
    at_cfg = {}
    for scale in spec.cfg_scales:  # e.g. the serving CFG: does the gain hold where the model is used?
        other = sampling.model_copy(update={"cfg_scale": scale})
        b, a = sample_and_score(before_model, sampling=other, **common), sample_and_score(policy, sampling=other, **common)
        at_cfg[f"{scale:g}"] = {name: paired_comparison(b[name], a[name]) for name in b}
    result = {
        "prompts": task.eval_prompts,
        "samples_per_prompt": spec.samples_per_prompt,
        "sampling": sampling.model_dump(mode="json"),
        "seed": spec.seed,
        "comparison": comparison,
        "comparison_at_cfg": at_cfg,
        "per_prompt": {"before": before, "after": after},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out_dir / EVAL, result)
    log.info("held-out reward (%d prompts x %d): %s", len(task.eval_prompts), spec.samples_per_prompt,
             json.dumps(comparison.get("total", {})))
    if task.samples is not None:
        for model, name in ((policy, SAMPLES), (before_model, SAMPLES_BEFORE)):
            img = sample_grid(model, vocab, vt_config, task.samples, task.grid, device, autocast)
            with atomic_path(out_dir / name) as tmp:
                img.save(tmp, format="PNG")
    return comparison


# ---------------------------------------------------------------------------------------------
# the Ray Train worker


def grpo_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("simplear").setLevel(logging.INFO)
    task: GRPOTask = config["task"]
    cfg = TrainConfig.model_validate(config["train"])
    out_dir = Path(config["out_dir"])
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    report = ray_report
    latest = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        resume_dir = Path(stack.enter_context(latest.as_directory())) if latest else None
        state = json.loads((resume_dir / TRAINER_STATE).read_text()) if resume_dir else {}
        if rank == 0:
            log.info("%s GRPO at step %d of %d: %d train / %d eval prompts, grid %s, world %d, device %s",
                     "resuming" if resume_dir else "starting", state.get("step", 0), cfg.steps, len(task.train_prompts),
                     len(task.eval_prompts), task.grid, world, device)
        if state.get("step", 0) >= cfg.steps:
            # a rerun after the last checkpoint (killed during the evaluation): trl would train one step more
            if rank == 0:
                _evaluate_checkpoint(task, cfg, resume_dir, out_dir, device)
            return
        resumed_at = state.get("resumed_at", []) + ([state["step"]] if resume_dir else [])
        hf_out = stack.enter_context(tempfile.TemporaryDirectory(prefix="simplear-grpo-hf-"))
        callback = _report_callback(task, cfg, out_dir, rank, resumed_at, report, device)
        trainer = build_trainer(task, cfg, hf_out, world_size=world, device=device, callbacks=[callback])
        callback.trainer = trainer
        trainer.train(resume_from_checkpoint=stack.enter_context(hf_resume_view(resume_dir)))
    if rank == 0:
        evaluate_before_after(task, trainer.accelerator.unwrap_model(trainer.model), trainer.vocab, trainer.visual_tokenizer,
                              trainer.simplear_vt_config, trainer.simplear_rewards, out_dir, device, trainer.accelerator.autocast)


def _evaluate_checkpoint(task: GRPOTask, cfg: TrainConfig, checkpoint_dir: Path, out_dir: Path, device) -> None:
    import torch

    from simplear.model import load_checkpoint

    ck = load_checkpoint(checkpoint_dir, device=device, dtype=torch.float32)
    autocast = contextlib.nullcontext
    if _use_bf16(cfg, use_cpu=device.type == "cpu"):
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    evaluate_before_after(task, ck.model, ck.vocab, _visual_tokenizer(ck.visual_tokenizer_config, device),
                          ck.visual_tokenizer_config, WeightedRewards.from_configs(task.rewards), out_dir, device, autocast)


# ---------------------------------------------------------------------------------------------
# the stage


def resolve_prompts(ctx: StageContext, spec: PromptSpec, where: str) -> tuple[list[str], list[str]]:
    """(train, eval) distinct prompts: shuffled with the seed, the first `eval_count` held out."""
    import pyarrow.parquet as pq

    found: list[str] = []
    if spec.source == "list":
        found = list(spec.items)
    elif spec.source == "stage":
        if spec.stage not in ctx.needs:
            raise ConfigError(f"{where}.prompts.stage: {spec.stage!r} is not among the stage's needs {ctx.needs}")
        base = ctx.input_dir(spec.stage)
        files = [f for f in ctx.input_files(spec.stage, ".parquet") if f.relative_to(base).parts[0] != "rejected"]
        if spec.resolution is not None:
            files = [f for f in files if f.relative_to(base).parts[0] == str(spec.resolution)]
        if not files:
            raise ConfigError(f"{where}.prompts.stage: stage {spec.stage!r} recorded no kept Parquet outputs"
                              + (f" under {spec.resolution}/" if spec.resolution is not None else ""))
        for f in files:
            if spec.column not in pq.read_schema(f).names:
                raise ConfigError(f"{where}.prompts.column: {f} has no column {spec.column!r}")
            found += [c for c in pq.read_table(f, columns=[spec.column])[spec.column].to_pylist()]
            if spec.max_prompts and len(set(found)) >= spec.max_prompts:
                break
    else:
        path = Path(spec.path)
        if not path.is_absolute():
            path = ctx.workflow_path.parent / path
        if not path.is_file():
            raise ConfigError(f"{where}.prompts.path: {path} not found")
        if path.suffix == ".parquet":
            found = pq.read_table(path, columns=[spec.column])[spec.column].to_pylist()
        else:
            found = path.read_text().splitlines()
    prompts = list(dict.fromkeys(p.strip() for p in found if isinstance(p, str) and p.strip()))
    if spec.max_prompts:
        prompts = prompts[: spec.max_prompts]
    random.Random(spec.seed).shuffle(prompts)
    if len(prompts) <= spec.eval_count:
        raise ConfigError(f"{where}.prompts: {len(prompts)} distinct prompts, not more than eval_count {spec.eval_count}")
    return prompts[spec.eval_count:], prompts[: spec.eval_count]


def plot_reward_curve(rows: list[dict], path: Path, title: str = "") -> None:
    """Reward mean ± std of each step's group samples (and each reward's mean); KL and clip fraction below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simplear.workflow.manifest import atomic_path

    def series(key):  # steps that reuse a generation (num_iterations > 1) log no rewards
        pts = [(r["step"], r[key], r.get("reward_std", 0.0)) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]

    fig, (ax, ax_kl) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps, mean, std = series("reward_mean")
    ax.plot(steps, mean, label="reward (weighted)", color="C0")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="C0", alpha=0.2,
                    label="± std")
    parts = sorted({k for r in rows for k in r if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"})
    if len(parts) > 1:
        for i, key in enumerate(parts):
            x, y, _ = series(key)
            ax.plot(x, y, label=key[len("reward_"):-len("_mean")], color=f"C{i + 1}", linewidth=1)
    ax.set_ylabel("reward of the group samples")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    x, y, _ = series("kl")
    ax_kl.plot(x, y, label="KL to reference", color="C3", linewidth=1)
    ax_kl.set_ylabel("KL", color="C3")
    ax_kl.set_xlabel("step")
    ax_kl.grid(alpha=0.3)
    ax_clip = ax_kl.twinx()
    x, y, _ = series("clip_fraction")
    ax_clip.plot(x, y, label="clip fraction", color="gray", linewidth=1)
    ax_clip.set_ylabel("clip fraction", color="gray")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {}
    k = max(1, min(10, len(rows) // 10))
    out: dict[str, Any] = {"logged_steps": len(rows), "last_step": rows[-1]["step"]}
    for key in ("reward_mean", "kl", "clip_fraction"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"{key}_start"] = round(statistics.fmean(vals[:k]), 5)
            out[f"{key}_end"] = round(statistics.fmean(vals[-k:]), 5)
    return out


def make_task(ctx: StageContext, cfg: GRPOStageConfig) -> GRPOTask:
    """Everything the workers need, checked before any of them starts."""
    from stages.sft import resolve_init
    from simplear.visual_tokenizers import VisualTokenizerConfig
    from simplear.vocab import META_FILE

    where = f"stages.{ctx.name}.config"
    init = resolve_init(ctx, cfg.init, where)
    vt = VisualTokenizerConfig.model_validate(json.loads((init / META_FILE).read_text())["visual_tokenizer"])
    H, W = (cfg.size, cfg.size) if isinstance(cfg.size, int) else cfg.size
    if H % vt.downsample or W % vt.downsample:
        raise ConfigError(f"{where}.size: {H}x{W} is not a multiple of the visual tokenizer's downsample {vt.downsample}")
    train_prompts, eval_prompts = resolve_prompts(ctx, cfg.prompts, where)
    return GRPOTask(init_path=str(init), grid=(H // vt.downsample, W // vt.downsample), train_prompts=train_prompts,
                    eval_prompts=eval_prompts, rewards=[r.model_dump(mode="json") for r in cfg.rewards],
                    sampling=cfg.sampling, grpo=cfg.grpo, eval=cfg.eval, samples=cfg.samples,
                    max_text_tokens=cfg.max_text_tokens, stage=ctx.name)


@register_stage("grpo", GRPOStageConfig, version=2, operational=TRAIN_OPERATIONAL, progress=train_progress)
def run(ctx: StageContext) -> StageResult:
    from simplear.workflow.manifest import atomic_path

    cfg: GRPOStageConfig = ctx.config
    task = make_task(ctx, cfg)
    train_prompts, eval_prompts, init = task.train_prompts, task.eval_prompts, task.init_path
    per_step_prompts = cfg.train.global_batch_size // cfg.grpo.num_generations
    ctx.log.info("%s: from %s, %d train prompts (%d per step x %d images), %d held out", ctx.name, init,
                 len(train_prompts), per_step_prompts, cfg.grpo.num_generations, len(eval_prompts))
    t0 = time.time()
    result = fit(task, cfg.train, stage_dir=ctx.stage_dir, resources=ctx.resources,
                 run_info={"stage": ctx.name}, worker=grpo_worker)
    if result.checkpoint is None:
        raise RuntimeError(f"{ctx.name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        with atomic_path(ctx.stage_dir / FINAL) as tmp:
            shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(OPTIMIZER, *HF_FILES[1:], "rng_state*", HF_STATE))
    state = json.loads((ctx.stage_dir / FINAL / TRAINER_STATE).read_text())
    if state["step"] != cfg.train.steps:
        raise RuntimeError(f"{ctx.name}: the last checkpoint is at step {state['step']}, not {cfg.train.steps}")
    rows = read_metrics(ctx.stage_dir)
    plot_reward_curve(rows, ctx.stage_dir / REWARD_CURVE,
                      title=f"{ctx.name}: G={cfg.grpo.num_generations}, beta={cfg.grpo.beta}, lr={cfg.train.lr:g}")
    evaluated = json.loads((ctx.stage_dir / EVAL).read_text())
    evaluation = {**evaluated["comparison"], **{f"{name}_cfg{scale}": c for scale, by_name in evaluated.get("comparison_at_cfg", {}).items()
                                                for name, c in by_name.items()}}
    metrics = {"steps": state["step"], "resumed_at": state.get("resumed_at", []), "train_seconds": round(time.time() - t0, 1),
               "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts), "grid": list(task.grid),
               **_summary(rows),
               **{f"eval_{name}_{k}": v for name, c in evaluation.items() for k, v in c.items()}}
    ctx.log.info("%s: %s", ctx.name, metrics)
    outputs = [FINAL, METRICS, REWARD_CURVE, EVAL] + [p for p in (SAMPLES, SAMPLES_BEFORE) if (ctx.stage_dir / p).exists()]
    return StageResult(metrics=metrics, outputs=outputs, artifacts=[SAMPLES_BEFORE, SAMPLES, REWARD_CURVE, EVAL, f"{FINAL}/"])
