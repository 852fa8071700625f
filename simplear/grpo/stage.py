"""The GRPO stage's body: prompts and init checked before any worker starts, then the shared training run
(`simplear.train.run_training` with the GRPO worker), the reward curve and the evaluation's figures."""

from __future__ import annotations


from simplear.config import ConfigError
from simplear.grpo.config import GRPOStageConfig, GRPOTask
from simplear.grpo.eval import EVAL
from simplear.train.config import SAMPLES_BEFORE
from simplear.grpo.prompts import resolve_prompts
from simplear.grpo.reporting import HF_RESUME_ONLY
from simplear.grpo.trainer import grpo_worker
from simplear.t2i import resolve_init
from simplear.train import FINAL, METRICS, SAMPLES, Panel, plot_curves, run_training, summarize

REWARD_CURVE = "reward_curve.png"
SUMMARY_KEYS = ("reward_mean", "kl", "clip_fraction")


def reward_panels(rows: list[dict]) -> list[Panel]:
    """The weighted reward ± the group std (and each reward's mean when there are several); KL and clip fraction below."""
    parts = sorted({k for r in rows for k in r if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"})
    curves = [("reward_mean", "reward (weighted)")]
    if len(parts) > 1:
        curves += [(k, k[len("reward_"):-len("_mean")]) for k in parts]
    return [Panel("reward of the group samples", curves, height=3, band="reward_std"),
            Panel("KL", [("kl", "KL to reference")], height=2, twin=Panel("clip fraction", [("clip_fraction", "clip fraction")]))]


def make_task(ctx, cfg: GRPOStageConfig) -> GRPOTask:
    """Everything the workers need, checked before any of them starts."""
    where = f"stages.{ctx.name}.config"
    init = resolve_init(ctx, cfg.init, where, cfg.visual_tokenizer)
    vt, defaults = init.visual_tokenizer, cfg.defaults.over(init.sampling)
    sampling = cfg.sampling.over(defaults)
    if not sampling.temperature:
        raise ConfigError(f"{where}.sampling.temperature: GRPO needs a temperature above 0 (log-probs of greedy draws "
                          "are not defined)")
    if sampling.mode != "visual":
        raise ConfigError(f"{where}.sampling.mode: GRPO's log-probs are over the visual ids; set mode: visual")
    H, W = (cfg.size, cfg.size) if isinstance(cfg.size, int) else cfg.size
    if H % vt.downsample or W % vt.downsample:
        raise ConfigError(f"{where}.size: {H}x{W} is not a multiple of the visual tokenizer's downsample {vt.downsample}")
    train_prompts, eval_prompts = resolve_prompts(ctx, cfg.prompts, where)
    return GRPOTask(init_path=init.location, visual_tokenizer=vt, grid=(H // vt.downsample, W // vt.downsample), train_prompts=train_prompts,
                    eval_prompts=eval_prompts, rewards=[r.model_dump(mode="json") for r in cfg.rewards],
                    sampling=sampling, defaults=defaults, grpo=cfg.grpo, eval=cfg.eval, samples=cfg.samples,
                    max_text_tokens=cfg.max_text_tokens, stage=ctx.name)


def eval_metrics(evaluated: dict) -> dict:
    """eval.json's paired comparisons as flat metrics: `eval_<score>_<figure>`, `eval_<score>_cfg<scale>_<figure>`."""
    by_score = {**evaluated["comparison"], **{f"{name}_cfg{scale}": c for scale, by_name in evaluated.get("comparison_at_cfg", {}).items()
                                              for name, c in by_name.items()}}
    return {f"eval_{name}_{k}": v for name, c in by_score.items() for k, v in c.items()}


def run_grpo_stage(ctx):
    from simplear.workflow.context import StageResult

    cfg: GRPOStageConfig = ctx.config
    task = make_task(ctx, cfg)
    ctx.log.info("%s: from %s, %d train prompts (%d per step x %d images), %d held out", ctx.name, task.init_path,
                 len(task.train_prompts), cfg.train.global_batch_size // cfg.grpo.num_generations, cfg.grpo.num_generations,
                 len(task.eval_prompts))
    run = run_training(ctx, task, cfg.train, worker=grpo_worker, exclude=HF_RESUME_ONLY)
    with ctx.output(REWARD_CURVE) as tmp:
        tmp.write_bytes(plot_curves(run.rows, reward_panels(run.rows),
                                    title=f"{ctx.name}: G={cfg.grpo.num_generations}, beta={cfg.grpo.beta}, lr={cfg.train.lr:g}"))
    metrics = {**run.metrics, "train_prompts": len(task.train_prompts), "eval_prompts": len(task.eval_prompts),
               "grid": list(task.grid), **summarize(run.rows, SUMMARY_KEYS, smooth_start=True),
               **eval_metrics(ctx.store.read_json(ctx.key(EVAL)))}
    ctx.log.debug("%s: %s", ctx.name, metrics)  # the engine's `done` line gives the key figures
    outputs = [FINAL, METRICS, REWARD_CURVE, EVAL] + [p for p in (SAMPLES, SAMPLES_BEFORE) if ctx.has_output(p)]
    return StageResult(metrics=metrics, outputs=outputs, artifacts=[SAMPLES_BEFORE, SAMPLES, REWARD_CURVE, EVAL, f"{FINAL}/"])
