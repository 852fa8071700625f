"""How images are drawn: the one settings type every way in shares (a checkpoint's defaults, the `sampling:` keys
of the configs, the CLI's flags; the HTTP API's `guidance_scale` is only a name at the edge), and the one way from
it into the engines' per-request `SamplingParams`.

A key left out (None) is taken from what the checkpoint records (`simplear.json`'s `sampling`): a project
checkpoint records the defaults of the stage that trained it (a stage's `defaults:` over its init's), a release
as published the reference inference settings (`REFERENCE_SAMPLING`), a checkpoint from before this record the
built-in `DEFAULT_SAMPLING`. So one checkpoint is drawn the same way by generate, serve, eval and GRPO unless a
config or a flag says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from simplear.config import StrictModel

# The smallest temperature other than 0 (greedy). Every engine divides float32 log-probs by it: below ~1e-37
# they overflow to -inf and the draw turns NaN (a blank image), and long before that the draw is the greedy one.
# vLLM treats temperatures under the same 1e-5 as greedy.
MIN_TEMPERATURE = 1e-5
PROMPT_SLOT = "{prompt}"


def check_temperature(temperature: float | None) -> float | None:
    """The rule every way in shares (configs, the CLI, the server's requests through `SamplingParams`)."""
    if temperature is not None and (temperature < 0 or 0 < temperature < MIN_TEMPERATURE):
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}")
    return temperature


def check_template(template: str | None) -> str | None:
    if template is not None and template.count(PROMPT_SLOT) != 1:
        raise ValueError(f"prompt_template must hold {PROMPT_SLOT} exactly once, got {template!r}")
    return template


def _unset(v) -> bool:
    return v is None


class SamplingSpec(StrictModel):
    cfg_scale: float | None = Field(None, ge=0, exclude_if=_unset,
                                    description="classifier-free guidance scale (1: none); None: the checkpoint's")
    temperature: float | None = Field(None, ge=0, exclude_if=_unset,
                                      description=f"0: greedy; otherwise at least {MIN_TEMPERATURE:g}; None: the "
                                                  "checkpoint's")
    top_k: int | None = Field(None, ge=1, exclude_if=_unset,
                              description="draw among the k likeliest codes (k >= the codebook: all of them, as the "
                                          "reference's 64,000); None: the checkpoint's")
    top_p: float | None = Field(None, gt=0, le=1, exclude_if=_unset,
                                description="draw among the likeliest codes holding p of the mass (1: all); None: the "
                                            "checkpoint's")
    negative_prompt: str | None = Field(None, exclude_if=_unset,
                                        description='the unconditional prompt of CFG ("": the dropped caption of '
                                                    "training); None: the checkpoint's")
    prompt_template: str | None = Field(None, exclude_if=_unset,
                                        description=f"the text the model sees for a prompt, with {PROMPT_SLOT} where "
                                                    "it goes (not applied to the negative prompt); None: the "
                                                    "checkpoint's")
    mode: Literal["visual", "reference"] | None = Field(
        None, exclude_if=_unset,
        description='"visual": a code is drawn among the visual ids only (every engine); "reference": as the '
                    "reference code's Hugging Face generate draws (CFG, top-k/top-p over the whole vocabulary, a text "
                    "id drawn is kept in the sequence and decodes as code 0; the torch engine only); None: the "
                    "checkpoint's")
    repetition_penalty: float | None = Field(
        None, gt=0, exclude_if=_unset,
        description="mode reference: Hugging Face's repetition penalty on the conditional logits of every id already "
                    "in the row (a release: its generation_config.json's); None: the checkpoint's")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        return check_temperature(v)

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return check_template(v)

    def is_empty(self) -> bool:
        """No key set: a config that leaves `sampling`/`defaults` out dumps (and fingerprints) as before it existed."""
        return not self.model_dump(exclude_none=True)

    def over(self, defaults: SamplingSpec) -> SamplingSpec:
        """These settings where set, `defaults`' elsewhere."""
        return defaults.model_copy(update=self.model_dump(exclude_none=True))

    def complete(self) -> SamplingSpec:
        """Every key set: the built-in defaults where this leaves one out."""
        return self.over(DEFAULT_SAMPLING)

    def params(self, seed: int | None, greedy: bool = False):
        """The engines' per-request parameters for one image (keys left out: the built-in defaults)."""
        from simplear.sampling.draw import SamplingParams

        s = self.complete()
        return SamplingParams(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              negative_prompt=s.negative_prompt, prompt_template=s.prompt_template, seed=seed,
                              greedy=greedy, reference_mode=s.mode == "reference",
                              repetition_penalty=s.repetition_penalty)


# The built-in defaults: CFG 1.5 beat 3 on held-out demo prompts at the serving size (ENVIRONMENT.md; the demo
# records it), no truncation, the training sequence format's plain caption and the dropped caption as negative.
DEFAULT_SAMPLING = SamplingSpec(cfg_scale=1.5, temperature=1.0, negative_prompt="", prompt_template=PROMPT_SLOT,
                                mode="visual", repetition_penalty=1.0)

# The reference inference settings of a release (wdrink/SimpleAR generate.py): CFG 6, temperature 1, top-k 64,000
# (every code of Cosmos DV8x16x16: no truncation), its template and negative prompt.
REFERENCE_NEGATIVE_PROMPT = ("An image of aerial view, overexposed, low quality, deformation, a poor composition, "
                             "bad hands, bad teeth, bad eyes, bad limbs, distortion")
REFERENCE_SAMPLING = SamplingSpec(cfg_scale=6.0, temperature=1.0, negative_prompt=REFERENCE_NEGATIVE_PROMPT,
                                  prompt_template="A highly realistic image of " + PROMPT_SLOT, mode="visual",
                                  repetition_penalty=1.0)


def recorded_sampling(meta: dict) -> SamplingSpec:
    """The defaults a checkpoint's `simplear.json` records, complete (see the module docstring)."""
    recorded = meta.get("sampling")
    if isinstance(recorded, dict):
        return SamplingSpec.model_validate(recorded).complete()
    return DEFAULT_SAMPLING
