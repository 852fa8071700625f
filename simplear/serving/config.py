"""The serve config and the request it takes (OpenAI images API): parsed and checked, or a 400 with a reason."""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from simplear.config import StrictModel
from simplear.sampling.spec import SamplingSpec
from simplear.serving.auth import env_api_keys
from simplear.visual_tokenizers import DECODE_BATCH, VisualTokenizerConfig
from simplear.vllm_engine import VLLMOptions
from simplear.vocab import MAX_TEXT_TOKENS


SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class ServeConfig(StrictModel):
    """The serve stage's and `simplear serve`'s config: the checkpoint and engine, where and to whom the app answers,
    its limits. No key is a field (a file or the environment holds them), so none reaches a manifest."""

    checkpoint: str | None = Field(None, description="a checkpoint folder; None: `<run_dir>/<from_stage>/final`")
    from_stage: str = Field("grpo", description="the stage whose final checkpoint is served (must be in `needs`)")
    visual_tokenizer: VisualTokenizerConfig | None = Field(
        None, exclude_if=lambda v: v is None,  # unset: the config (and its fingerprint) as before it existed
        description="for a released checkpoint as published (it names none): the visual tokenizer it decodes "
                          "with, e.g. {kind: cosmos, path: Cosmos-1.0-Tokenizer-DV8x16x16}; a project checkpoint's own wins")
    engine: Literal["vllm", "torch"] = Field("vllm", description="vLLM, or the project's torch sampler")
    sjd_window: int | None = Field(None, ge=1, description="torch engine: speculative Jacobi decoding with this "
                                                           "many drafts")
    device: str = Field("auto", description='torch engine: "auto" = cuda when the replica has a GPU, else cpu')
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description='torch engine\'s weights: "auto" = bf16 on a GPU, else the checkpoint\'s')
    host: str = Field("127.0.0.1", description="where Serve's HTTP proxy listens if this starts it (a running "
                                               "Serve keeps its own); beyond loopback an API key is required")
    api_keys_file: str | None = Field(None, description="one API key per line, read at start (keys also come from "
                                                        "$SIMPLEAR_API_KEYS); keep it private (mode 600)")
    port: int = Field(8000, ge=1, le=65535, description="the proxy's port if this starts Serve")
    app_name: str = Field("simplear", description="the Serve application's name")
    replace_existing: bool = Field(False, description="deploy over a running Serve app of the same app_name; "
                                                      "false: refuse to")
    route_prefix: str = Field("/", description="URL prefix of the app")
    sizes: list[str] = Field(["64x64"], min_length=1, description='"WxH" in pixels; the first is the default')
    max_prompt_chars: int = Field(1000, ge=1, description="a longer prompt or negative prompt gets 400")
    max_n: int = Field(4, ge=1, description="images per request")
    max_text_tokens: int = Field(MAX_TEXT_TOKENS, ge=1, description="caption tokens the model sees (longer ones are "
                                                                    "cut), as trained")
    max_batch_size: int = Field(16, ge=1, description="requests gathered into one engine call")
    decode_batch: int = Field(DECODE_BATCH, ge=1, description="1024x1024 images per visual-tokenizer decode call (more "
                                                               "of smaller ones): bounds the decoder's memory beside "
                                                               "the engine at max_batch_size x max_n images")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    max_concurrent_requests: int = Field(64, ge=1, description="per replica, generating or waiting for a batch; the "
                                                               "next gets 429")
    retry_after_s: int = Field(2, ge=1, description="the Retry-After header of a 429")
    request_timeout_s: float = Field(300, gt=0, description="an admitted request not answered by then (wait + "
                                                            "generation) gets 504")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="a longer request body gets 413")
    body_timeout_s: float = Field(10, gt=0, description="a request body not in whole by then gets 408: a slow "
                                                        "sender would hold one of the replica's request slots")
    sampling: SamplingSpec = Field(SamplingSpec(), exclude_if=SamplingSpec.is_empty,
                                   description="what a request leaves out gets; keys left out here: the checkpoint's "
                                               "recorded defaults (the HTTP API names cfg_scale guidance_scale)")
    vllm: VLLMOptions = Field(VLLMOptions(), description="the vLLM engine's options")
    smoke_prompt: str | None = Field("a red circle on a blue background",
                                     description="the stage's check: max_batch_size requests of max_n images each at "
                                                 "the largest size, at once (the replica's full load); None: no check")

    _driver_api_keys: list[str] = PrivateAttr(default_factory=list)

    def __getstate__(self) -> dict:
        """A ServeConfig pickled for a Ray task (the serve stage's) carries this process's $SIMPLEAR_API_KEYS: the
        driver took them out of its environment before Ray started, so the task cannot read them from its own.
        A private attribute is never dumped: no manifest, fingerprint, log or Serve controller sees it."""
        state = super().__getstate__()
        private = dict(state["__pydantic_private__"] or {})
        private["_driver_api_keys"] = list(dict.fromkeys(self._driver_api_keys + env_api_keys()))
        return {**state, "__pydantic_private__": private}

    @property
    def driver_api_keys(self) -> list[str]:
        """The $SIMPLEAR_API_KEYS of the driver that sent this config to a task (none where it was made here)."""
        return list(self._driver_api_keys)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for s in sizes:
            m = SIZE_RE.match(s)
            if not m or int(m[1]) < 1 or int(m[2]) < 1:
                raise ValueError(f"size {s!r} is not WIDTHxHEIGHT in pixels, e.g. 64x64")
        return sizes

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _engine_options(self):
        if self.sjd_window is not None and self.engine != "torch":
            raise ValueError("sjd_window (speculative Jacobi decoding) needs engine: torch")
        if self.dtype != "auto" and self.engine != "torch":
            raise ValueError("dtype is the torch engine's; the vLLM engine's is vllm.dtype")
        if self.max_concurrent_requests < self.max_batch_size:
            raise ValueError(f"max_concurrent_requests ({self.max_concurrent_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): a batch could never fill")
        return self

    def parsed_sizes(self) -> list[tuple[int, int]]:
        """(width, height) per served size."""
        return [(int(m[1]), int(m[2])) for m in (SIZE_RE.match(s) for s in self.sizes)]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


# -- requests ---------------------------------------------------------------------------------------


class ImageRequest(BaseModel):
    """POST /v1/images/generations; `None` means the server's default. `model` and `user` are
    accepted (and ignored) so that OpenAI clients work; any other unknown key is an error."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = None
    guidance_scale: float | None = Field(None, ge=0, le=50)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    negative_prompt: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None
    user: str | None = None

    @field_validator("n", "seed", "top_k", "guidance_scale", "temperature", "top_p", mode="before")
    @classmethod
    def _numbers_only(cls, v):
        if isinstance(v, (str, bool)):  # pydantic would take "3" or true for a number
            raise ValueError("must be a number")
        return v

    @field_validator("n", "seed", "top_k", mode="before")
    @classmethod
    def _whole(cls, v):
        if isinstance(v, float):
            raise ValueError("must be an integer")
        return v


    def sampling(self) -> SamplingSpec:
        """The request's own settings; the server's defaults fill in the rest. Its rules (e.g. the temperature's) are
        the configs', so a refusal names the same bounds."""
        return SamplingSpec(cfg_scale=self.guidance_scale, temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, negative_prompt=self.negative_prompt)


def request_defaults(spec: SamplingSpec) -> dict:
    """What a request that leaves a parameter out gets, under the request's names (the page's form, /health)."""
    d = spec.complete()
    return {"guidance_scale": d.cfg_scale, "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
            "negative_prompt": d.negative_prompt, "prompt_template": d.prompt_template}


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_request(body: bytes, cfg: ServeConfig) -> tuple[ImageRequest, tuple[int, int]]:
    """The request and its (width, height), or RequestError with an OpenAI-style message."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise RequestError("malformed JSON body: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        req = ImageRequest.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: "
                f"{'unknown parameter' if err['type'] == 'extra_forbidden' else err['msg']}" for err in e.errors()]
        raise RequestError("; ".join(msgs), param) from None
    if not req.prompt.strip():
        raise RequestError("prompt must not be empty", "prompt")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name) or ""
        if len(text) > cfg.max_prompt_chars:
            raise RequestError(f"{name} is longer than {cfg.max_prompt_chars} characters", name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: the tokenizer would fail the whole batch
            raise RequestError(f"{name} is not valid Unicode (a lone surrogate)", name) from None
    try:
        req.sampling()
    except ValidationError as e:  # the configs' rules (the temperature's floor): their own words, with the key
        first = e.errors()[0]
        raise RequestError(str(first.get("ctx", {}).get("error") or first["msg"]), str(first["loc"][0])) from None
    if req.n > cfg.max_n:
        raise RequestError(f"n must be at most {cfg.max_n}, got {req.n}", "n")
    size = req.size or cfg.sizes[0]
    if size not in cfg.sizes:
        raise RequestError(f"unsupported size {size!r}; supported: {', '.join(cfg.sizes)}", "size")
    w, h = (int(x) for x in SIZE_RE.match(size).groups())
    return req, (w, h)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
