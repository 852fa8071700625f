"""trl's `GRPOTrainer` with images as completions.

Generation is overridden (trl's `rollout_func`): the completions of a group are visual tokens drawn by
the project's `TorchSampler` (KV cache, optional CFG, visual ids only), decoded to images by the visual
tokenizer and scored on the images by `simplear.rewards` (weighted, one trl reward function each);
log-probs come from `simplear.grpo.logps`.
"""

from __future__ import annotations

import zlib

from simplear.sampling.spec import SamplingSpec
from simplear.grpo.logps import install_visual_head, visual_logps
from simplear.rewards import WeightedRewards


def rollout_seed(seed: int, step: int, rank: int, index: int) -> int:
    """Per image: the same draws after a resume, distinct across steps, workers and the group."""
    return zlib.crc32(f"grpo/{seed}/{step}/{rank}/{index}".encode())


def trainer_class():
    from trl import GRPOTrainer

    class VisualGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose completions are images: sampled, decoded and scored by the project's code."""

        def __init__(self, *args, vocab, visual_tokenizer, grid, sampling: SamplingSpec, sampling_seed: int,
                     max_text_tokens: int | None = None, **kwargs):
            self.vocab, self.visual_tokenizer, self.grid = vocab, visual_tokenizer, tuple(grid)
            self.sampling, self.sampling_seed, self.max_text_tokens = sampling, sampling_seed, max_text_tokens
            self.draw = sampling.params(None)  # the settings every rollout image shares (its seed aside)
            self.uncond_ids = vocab.prompt_ids(self.draw.negative_prompt, max_text_tokens)
            super().__init__(*args, rollout_func=self._rollout, **kwargs)
            for m in (self.model, self.ref_model):
                if m is not None:
                    install_visual_head(self.accelerator.unwrap_model(m), vocab)

        def _rollout(self, prompts: list[str], trainer) -> dict[str, list]:
            from simplear.sampler import TorchSampler

            model = self.accelerator.unwrap_model(self.model)
            sampler = TorchSampler(model, self.vocab, max_text_tokens=self.max_text_tokens)
            step, rank = self.state.global_step, self.accelerator.process_index
            params = [self.sampling.params(rollout_seed(self.sampling_seed, step, rank, i)) for i in range(len(prompts))]
            with self.accelerator.autocast():
                codes, logps = sampler.generate_codes(list(prompts), self.grid, params, return_logprobs=True)
            images = self.visual_tokenizer.decode(codes).float().cpu()
            return {
                "prompt_ids": [self.vocab.prompt_ids(self.draw.conditional(p), self.max_text_tokens) for p in prompts],
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
                                           logits_to_keep, self.vocab, self.draw, self.uncond_ids, compute_entropy)
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

