"""How images are drawn, as a workflow's config says it (GRPO's rollouts and held-out check, the eval stage):
one set of keys and one way into the engines' `SamplingParams`, with the seed each image gets."""

from __future__ import annotations

from pydantic import Field

from simplear.config import StrictModel


class SamplingSpec(StrictModel):
    cfg_scale: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    negative_prompt: str = ""

    def params(self, seed: int | None):
        from simplear.sampling.draw import SamplingParams

        return SamplingParams(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              negative_prompt=self.negative_prompt, seed=seed)
