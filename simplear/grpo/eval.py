"""The held-out evaluation at the end of GRPO: the init (SFT) model and the trained policy on prompts held out
of training, with the same seeds for both so that the difference is paired; the trained rewards, extra scorers
it was not trained on (the eval stage's scorers, `simplear.scorers`), and again at other CFG scales (the serving one)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from pathlib import Path

from simplear.grpo.config import GRPOTask
from simplear.sampling.spec import SamplingSpec
from simplear.rewards import WeightedRewards
from simplear.scorers import Scorer, build_scorer, items_from_prompts
from simplear.t2i import sample_grid
from simplear.train import SAMPLES, TrainConfig
from simplear.train.config import SAMPLES_BEFORE

log = logging.getLogger("simplear.grpo")

EVAL = "eval.json"


def sample_and_score(model, vocab, visual_tokenizer, rewards: WeightedRewards, prompts: list[str], grid, sampling: SamplingSpec,
                     per_prompt: int, seed: int, batch_size: int, max_text_tokens=None, autocast=contextlib.nullcontext,
                     scorers: tuple[Scorer, ...] = ()) -> dict:
    """Per reward (and "total", their weighted sum), per extra scorer and per figure of its own ("<scorer>.<figure>"):
    the mean score of each prompt over its samples."""
    from simplear.sampler import TorchSampler

    sampler = TorchSampler(model, vocab, max_text_tokens=max_text_tokens)
    requests = [(p, seed + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]
    scores: dict[str, list] = {}
    for b in range(0, len(requests), batch_size):
        chunk = requests[b: b + batch_size]
        params = [sampling.params(s) for _, s in chunk]
        with autocast():
            codes = sampler.generate_codes([p for p, _ in chunk], grid, params)
        images = visual_tokenizer.decode(codes).float().cpu()
        texts = [p for p, _ in chunk]
        got = rewards.score(images, texts)
        trained = set(got)
        for scorer in scorers:  # named apart from a trained reward of the same name (hps)
            name = scorer.name if scorer.name not in trained else f"{scorer.name}_eval"
            records = scorer.score(images, items_from_prompts(texts))
            got[name] = [r["score"] for r in records]
            for f in scorer.figures:
                got[f"{name}.{f}"] = [None if r.get(f) is None else float(r[f]) for r in records]
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
    sampling = spec.sampling.over(task.sampling)
    before_model = load_checkpoint(task.init_path, device=device, dtype=torch.float32, visual_tokenizer=task.visual_tokenizer).model
    scorers = tuple(build_scorer(c) for c in spec.scorers)
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
            img = sample_grid(model, vocab, vt_config, task.samples, task.defaults, task.grid, device, autocast)
            with atomic_path(out_dir / name) as tmp:
                img.save(tmp, format="PNG")
    return comparison


def evaluate_checkpoint(task: GRPOTask, cfg: TrainConfig, checkpoint_dir: Path, out_dir: Path, device) -> None:
    """The evaluation of a run whose training had finished (killed while evaluating): from its last checkpoint."""
    import torch

    from simplear.model import load_checkpoint
    from simplear.train.parallel import autocast_for
    from simplear.visual_tokenizers import load_visual_tokenizer

    ck = load_checkpoint(checkpoint_dir, device=device, dtype=torch.float32)
    evaluate_before_after(task, ck.model, ck.vocab, load_visual_tokenizer(ck.visual_tokenizer_config, device),
                          ck.visual_tokenizer_config, WeightedRewards.from_configs(task.rewards), out_dir, device,
                          autocast_for(cfg, device, world_size=1))
