"""How images are drawn, as a workflow's config says it (GRPO's rollouts and held-out check, the eval stage):
one set of keys and one way into the engines' `SamplingParams`, with the seed each image gets."""

from __future__ import annotations

from pydantic import Field, field_validator

from simplear.config import StrictModel

# The smallest temperature other than 0 (greedy). Every engine divides float32 log-probs by it: below ~1e-37
# they overflow to -inf and the draw turns NaN (a blank image), and long before that the draw is the greedy one.
# vLLM treats temperatures under the same 1e-5 as greedy.
MIN_TEMPERATURE = 1e-5


def check_temperature(temperature: float) -> float:
    """The rule every way in shares (configs, the CLI, the server's requests through `SamplingParams`)."""
    if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}")
    return temperature


class SamplingSpec(StrictModel):
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance scale (1: none)")
    temperature: float = Field(1.0, ge=0, description=f"0: greedy; otherwise at least {MIN_TEMPERATURE:g}")
    top_k: int | None = Field(None, ge=1, description="draw among the k most probable codes only")
    top_p: float | None = Field(None, gt=0, le=1, description="draw among the likeliest codes holding p of the mass")
    negative_prompt: str = Field("", description="the unconditional prompt of CFG")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return check_temperature(v)

    def params(self, seed: int | None):
        from simplear.sampling.draw import SamplingParams

        return SamplingParams(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, negative_prompt=self.negative_prompt, seed=seed)
