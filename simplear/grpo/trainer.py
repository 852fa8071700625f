"""The GRPO worker: trl's trainer (`simplear.grpo.rollout`) inside a Ray Train worker, built from the shared
`train:` block, reporting through the shared session, then the held-out evaluation on rank 0."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any

from simplear.grpo.config import GRPOTask
from simplear.grpo.eval import evaluate_before_after, evaluate_checkpoint
from simplear.grpo.reporting import hf_resume_view, report_callback
from simplear.grpo.rollout import trainer_class, trl_reward_functions
from simplear.rewards import WeightedRewards
from simplear.storage.staging import staging_dir
from simplear.train import TRAINER_STATE, RaySession, TrainConfig, setup_worker_logging
from simplear.train.parallel import use_bf16
from simplear.train.workdir import WorkDir
from simplear.visual_tokenizers import load_visual_tokenizer

log = logging.getLogger("simplear.grpo")


def grpo_arguments(task: GRPOTask, cfg: TrainConfig, output_dir: str, world_size: int, device, **overrides):
    """The shared `train:` block in trl's names, and the algorithm's; every TrainConfig key GRPO accepts maps here."""
    from trl import GRPOConfig

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
        bf16=use_bf16(cfg, device),
        use_cpu=device.type == "cpu",
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
    ck = load_checkpoint(task.init_path, dtype=torch.float32, visual_tokenizer=task.visual_tokenizer)
    rewards = rewards or WeightedRewards.from_configs(task.rewards)
    args = grpo_arguments(task, cfg, output_dir, world_size, device, reward_weights=rewards.weights, **arg_overrides)
    cls = trainer_class()
    trainer = cls(
        model=ck.model,
        reward_funcs=trl_reward_functions(rewards),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": task.train_prompts}),
        processing_class=ck.vocab.text_tokenizer,
        callbacks=list(callbacks),
        vocab=ck.vocab,
        visual_tokenizer=load_visual_tokenizer(ck.visual_tokenizer_config, device),
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


def grpo_worker(config: dict) -> None:
    """`fit(worker=grpo_worker)`: resume from the latest checkpoint, train to `steps`, evaluate on rank 0."""
    import torch

    setup_worker_logging()
    task: GRPOTask = config["task"]
    cfg = TrainConfig.model_validate(config["train"])
    work = WorkDir.of(config["run"], config["stage"])  # logs and figures: published to the run dir on object storage
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    session = RaySession()
    rank, world, device = session.rank, session.world_size, session.device
    with contextlib.ExitStack() as stack:
        resume_dir = stack.enter_context(session.latest_checkpoint())
        state = json.loads((resume_dir / TRAINER_STATE).read_text()) if resume_dir else {}
        if rank == 0:
            log.info("%s GRPO at step %d of %d: %d train / %d eval prompts, grid %s, world %d, device %s",
                     "resuming" if resume_dir else "starting", state.get("step", 0), cfg.steps, len(task.train_prompts),
                     len(task.eval_prompts), task.grid, world, device)
        if state.get("step", 0) >= cfg.steps:
            # a rerun after the last checkpoint (killed during the evaluation): trl would train one step more
            if rank == 0:
                evaluate_checkpoint(task, cfg, resume_dir, work.path, device)
                work.publish()
            return
        resumed_at = state.get("resumed_at", []) + ([state["step"]] if resume_dir else [])
        hf_out = stack.enter_context(tempfile.TemporaryDirectory(prefix="grpo-hf-", dir=staging_dir()))  # trl's saves
        callback = report_callback(task, cfg, work, session, resumed_at)
        trainer = build_trainer(task, cfg, hf_out, world_size=world, device=device, callbacks=[callback])
        callback.trainer = trainer
        trainer.train(resume_from_checkpoint=stack.enter_context(hf_resume_view(resume_dir)))
    if rank == 0:
        evaluate_before_after(task, trainer.accelerator.unwrap_model(trainer.model), trainer.vocab, trainer.visual_tokenizer,
                              trainer.simplear_vt_config, trainer.simplear_rewards, work.path, device, trainer.accelerator.autocast)
        work.publish()
