"""`serve`: a trained checkpoint behind an HTTP API and a web page, on Ray Serve (engine vLLM or torch).

    POST /v1/images/generations   {"prompt", "n", "size", "guidance_scale", "seed", "temperature", "top_k",
                                   "top_p", "negative_prompt"} -> {"created", "data": [{"b64_json", "seed"}]}
    GET  /                        a page to type a prompt and see the images
    GET  /v1/health               engine, checkpoint, sizes, defaults, limits, batching counters

The request and response follow OpenAI's images API (`response_format` b64_json only); a bad
request gets a 400 with `{"error": {"message", "type": "invalid_request_error", "param"}}`.
Concurrent requests are gathered by `serve.batch` into one engine call (per image size).

In a workflow the stage deploys the app, checks it with one request (the image is kept as
`sample.png`), writes `endpoint.json` and returns: on a cluster the Serve app outlives the stage's
task; on the demo's embedded Ray it ends with the run, so `simplear serve` is how a local user keeps
it up (it runs the same app in the foreground).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simplear.config import StrictModel
from simplear.vllm_engine import VLLMOptions
from simplear.vocab import MAX_TEXT_TOKENS
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.registry import register_stage

SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class GenerationDefaults(StrictModel):
    """What a request that leaves a parameter out gets."""

    guidance_scale: float = Field(1.5, ge=0, le=50)  # 1.5 beat 3 on held-out demo prompts (ENVIRONMENT.md)
    temperature: float = Field(1.0, ge=0, le=10)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)


class ServeConfig(StrictModel):
    checkpoint: str | None = None  # a checkpoint folder; None: `<run_dir>/<from_stage>/final`
    from_stage: str = "grpo"  # the stage whose final checkpoint is served (must be in `needs`)
    engine: Literal["vllm", "torch"] = "vllm"
    sjd_window: int | None = Field(None, ge=1)  # torch engine: speculative Jacobi decoding with this many drafts
    device: str = "auto"  # torch engine: "auto" = cuda when the replica has a GPU, else cpu
    host: str = "127.0.0.1"  # where the HTTP proxy listens; 0.0.0.0 exposes it
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "simplear"
    route_prefix: str = "/"
    sizes: list[str] = Field(["64x64"], min_length=1)  # "WxH" in pixels; the first is the default
    max_prompt_chars: int = Field(1000, ge=1)
    max_n: int = Field(4, ge=1)
    max_text_tokens: int = Field(MAX_TEXT_TOKENS, ge=1)  # caption tokens the model sees (longer ones are cut), as trained
    max_batch_size: int = Field(16, ge=1)  # requests gathered into one engine call
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    defaults: GenerationDefaults = GenerationDefaults()
    vllm: VLLMOptions = VLLMOptions()
    smoke_prompt: str | None = "a red circle on a blue background"  # the stage's check request; None: no check

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
    negative_prompt: str = ""
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
    if not isinstance(obj, dict):
        raise RequestError(f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        req = ImageRequest.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {'unknown parameter' if err['type'] == 'extra_forbidden' else err['msg']}"
                for err in e.errors()]
        raise RequestError("; ".join(msgs), param) from None
    if not req.prompt.strip():
        raise RequestError("prompt must not be empty", "prompt")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > cfg.max_prompt_chars:
            raise RequestError(f"{name} is longer than {cfg.max_prompt_chars} characters", name)
    if req.n > cfg.max_n:
        raise RequestError(f"n must be at most {cfg.max_n}, got {req.n}", "n")
    size = req.size or cfg.sizes[0]
    if size not in cfg.sizes:
        raise RequestError(f"unsupported size {size!r}; supported: {', '.join(cfg.sizes)}", "size")
    w, h = (int(x) for x in SIZE_RE.match(size).groups())
    return req, (w, h)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# -- the engine -------------------------------------------------------------------------------------


def read_checkpoint_meta(path: Path) -> dict:
    from simplear.model import is_checkpoint
    from simplear.vocab import META_FILE

    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not is_checkpoint(path):
        raise ValueError(f"not a SimpleAR checkpoint: {path} (no valid {META_FILE})")
    return json.loads((path / META_FILE).read_text())


def build_engine(checkpoint: Path, cfg: ServeConfig):
    """A sampler with `generate_images(prompts, size=(H, W), params=[...])`: vLLM, torch or torch + SJD."""
    from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer

    meta = read_checkpoint_meta(checkpoint)
    vt = load_visual_tokenizer(VisualTokenizerConfig.model_validate(meta["visual_tokenizer"]))
    for w, h in cfg.parsed_sizes():
        if w % vt.downsample or h % vt.downsample:
            raise ValueError(f"size {w}x{h} is not a multiple of the visual tokenizer's downsample {vt.downsample}")
    if cfg.engine == "vllm":
        from simplear.vllm_engine import VLLMSampler

        max_tokens = max((w // vt.downsample) * (h // vt.downsample) for w, h in cfg.parsed_sizes())
        return VLLMSampler(checkpoint, vt, cfg.vllm, max_text_tokens=cfg.max_text_tokens, max_image_tokens=max_tokens)

    from simplear.devices import resolve_device
    from simplear.model import load_checkpoint
    from simplear.sampler import TorchSampler

    ckpt = load_checkpoint(checkpoint, device=resolve_device(cfg.device))
    sampler = TorchSampler(ckpt.model, ckpt.vocab, vt, max_text_tokens=cfg.max_text_tokens)
    if cfg.sjd_window:
        from simplear.jacobi import JacobiSampler

        return JacobiSampler(sampler, window=cfg.sjd_window)
    return sampler


@dataclass
class _Job:
    prompts: list[str]
    size: tuple[int, int]  # (width, height)
    params: list  # simplear.sampler.SamplingParams, one per image


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ImageServer:
    """The Serve deployment (wrapped by `serve.deployment` in `build_app`): routing by path, batching, the page."""

    def __init__(self, checkpoint: str, config: dict):
        from ray import serve

        self.cfg = ServeConfig.model_validate(config)
        self.checkpoint = Path(checkpoint)
        self.engine = build_engine(self.checkpoint, self.cfg)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch_requests": 0}
        # Batching is set up per replica so that its size and wait come from the config.
        self._batched = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                    batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(self._run_batch)

    async def __call__(self, request):
        from starlette.responses import HTMLResponse, JSONResponse

        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {("GET", "/"): "page", ("GET", "/v1/health"): "health", ("POST", "/v1/images/generations"): "generate"}
        route = routes.get((request.method, path))
        if route is None:
            known = [p for (_, p) in routes]
            status = 405 if path in known else 404
            msg = f"{request.method} {path} is not allowed" if status == 405 else f"no route {path}"
            return JSONResponse(error_body(msg, kind="not_found" if status == 404 else "method_not_allowed"), status_code=status)
        if route == "page":
            return HTMLResponse(render_page(self.cfg, api_root=root.rstrip("/")))
        if route == "health":
            return JSONResponse(self.health())
        try:
            req, (w, h) = parse_request(await request.body(), self.cfg)
        except RequestError as e:
            return JSONResponse(error_body(str(e), e.param), status_code=400)
        try:
            job = self._job(req, (w, h))
        except ValueError as e:
            return JSONResponse(error_body(str(e)), status_code=400)
        self.stats["requests"] += 1
        try:
            images = await self._batched(job)
        except Exception as e:  # noqa: BLE001 - the clients of the batch get a message, the replica stays up
            return JSONResponse(error_body(f"{type(e).__name__}: {e}", kind="server_error"), status_code=500)
        data = [{"b64_json": b64, "seed": p.seed} for b64, p in zip(images, job.params)]
        return JSONResponse({"created": int(time.time()), "data": data})

    def health(self) -> dict:
        return {
            "status": "ok",
            "engine": self.cfg.engine if not self.cfg.sjd_window else f"torch+sjd(window={self.cfg.sjd_window})",
            "checkpoint": str(self.checkpoint),
            "sizes": self.cfg.sizes,
            "defaults": self.cfg.defaults.model_dump(),
            "max_n": self.cfg.max_n,
            "max_prompt_chars": self.cfg.max_prompt_chars,
            "stats": dict(self.stats),
        }

    def _job(self, req: ImageRequest, size: tuple[int, int]) -> _Job:
        from simplear.sampler import SamplingParams

        d = self.cfg.defaults
        base = SamplingParams(
            cfg_scale=d.guidance_scale if req.guidance_scale is None else req.guidance_scale,
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_k=d.top_k if req.top_k is None else req.top_k,
            top_p=d.top_p if req.top_p is None else req.top_p,
            negative_prompt=req.negative_prompt,
        )
        first = req.seed if req.seed is not None else secrets.randbits(62)
        params = [replace(base, seed=(first + i) % 2**63) for i in range(req.n)]  # one repeatable seed per image
        return _Job([req.prompt] * req.n, size, params)

    async def _run_batch(self, jobs: list[_Job]) -> list[list[str]]:
        self.stats["batches"] += 1
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(jobs))
        self.stats["images"] += sum(len(j.prompts) for j in jobs)
        # One engine call per size; serve.batch runs one batch at a time, so the engine is never shared.
        return await asyncio.to_thread(self._generate, jobs)

    def _generate(self, jobs: list[_Job]) -> list[list[str]]:
        out: list[list[str] | None] = [None] * len(jobs)
        for size in dict.fromkeys(j.size for j in jobs):
            idx = [i for i, j in enumerate(jobs) if j.size == size]
            prompts = [p for i in idx for p in jobs[i].prompts]
            params = [p for i in idx for p in jobs[i].params]
            w, h = size
            images = [_png_b64(im) for im in self.engine.generate_images(prompts, size=(h, w), params=params)]
            k = 0
            for i in idx:
                n = len(jobs[i].prompts)
                out[i] = images[k:k + n]
                k += n
        return out


def build_app(checkpoint: str | Path, cfg: ServeConfig, cpus: float = 1.0, gpus: float = 0.0,
              replicas: int = 1, env: dict[str, str] | None = None):
    """The bound Serve application (pass it to `serve.run`)."""
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    env_vars = {"OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    actor_options["runtime_env"] = {"env_vars": env_vars}
    deployment = serve.deployment(
        ImageServer,
        name="ImageServer",
        num_replicas=replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(str(checkpoint), cfg.model_dump(mode="json"))


def start(checkpoint: str | Path, cfg: ServeConfig, blocking: bool = False, **app_kwargs):
    """Start Serve's proxy on cfg.host:cfg.port (if Serve is not up yet) and run the app; returns its handle."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(checkpoint, cfg, **app_kwargs), name=cfg.app_name, route_prefix=cfg.route_prefix,
                     blocking=blocking)


def resolve_checkpoint(cfg: ServeConfig, run_dir: Path, needs: list[str] | None = None) -> Path:
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    if needs is not None and cfg.from_stage not in needs:
        raise ValueError(f"from_stage {cfg.from_stage!r} is not in the stage's needs {needs}: add it or set checkpoint")
    return Path(run_dir) / cfg.from_stage / "final"


# -- the page ---------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SimpleAR</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 form { display: grid; grid-template-columns: repeat(4, 1fr); gap: .5rem 1rem; align-items: end; }
 label { display: flex; flex-direction: column; font-size: .85rem; gap: .2rem; }
 #prompt-label { grid-column: 1 / -1; }
 textarea { font: inherit; min-height: 3.5rem; }
 button { grid-column: 1 / -1; padding: .6rem; font-size: 1rem; cursor: pointer; }
 #status { min-height: 1.5rem; margin: 1rem 0; }
 #status.error { color: #b00020; }
 #images { display: flex; flex-wrap: wrap; gap: 1rem; }
 #images figure { margin: 0; } #images img { width: 256px; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
 #images figcaption { font-size: .75rem; color: #666; }
</style></head>
<body>
<h1>SimpleAR</h1>
<p>Text-to-image with an autoregressive transformer over visual tokens. Engine: <b id="engine"></b>.</p>
<form id="form">
 <label id="prompt-label">Prompt <textarea id="prompt" name="prompt" required placeholder="a red circle on a blue background"></textarea></label>
 <label>Images <input id="n" type="number" min="1" value="1"></label>
 <label>Size <select id="size"></select></label>
 <label>Guidance scale <input id="guidance_scale" type="number" step="0.1" min="0"></label>
 <label>Seed <input id="seed" type="number" min="0" placeholder="random"></label>
 <label>Temperature <input id="temperature" type="number" step="0.05" min="0"></label>
 <label>Top-k <input id="top_k" type="number" min="1" placeholder="off"></label>
 <label>Top-p <input id="top_p" type="number" step="0.01" min="0" max="1" placeholder="off"></label>
 <label>Negative prompt <input id="negative_prompt" type="text" placeholder="(empty)"></label>
 <button id="generate" type="submit">Generate</button>
</form>
<div id="status" role="status"></div>
<div id="images"></div>
<script>
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
$("engine").textContent = CONFIG.engine;
$("n").max = CONFIG.max_n;
$("prompt").maxLength = CONFIG.max_prompt_chars;
for (const s of CONFIG.sizes) { const o = document.createElement("option"); o.value = o.textContent = s; $("size").appendChild(o); }
$("guidance_scale").value = CONFIG.defaults.guidance_scale;
$("temperature").value = CONFIG.defaults.temperature;
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { prompt: $("prompt").value, n: Number($("n").value), size: $("size").value };
  for (const k of ["guidance_scale", "temperature", "top_p"]) if ($(k).value !== "") body[k] = Number($(k).value);
  for (const k of ["seed", "top_k"]) if ($(k).value !== "") body[k] = parseInt($(k).value, 10);
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  const status = $("status");
  status.className = ""; status.textContent = "Generating…"; $("generate").disabled = true;
  const t0 = performance.now();
  try {
    const r = await fetch(CONFIG.api, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    $("images").replaceChildren(...j.data.map((d) => {
      const fig = document.createElement("figure"), img = new Image(), cap = document.createElement("figcaption");
      img.src = "data:image/png;base64," + d.b64_json; img.alt = body.prompt; img.className = "result";
      cap.textContent = "seed " + d.seed; fig.append(img, cap); return fig;
    }));
    status.textContent = j.data.length + " image(s) in " + ((performance.now() - t0) / 1000).toFixed(1) + " s";
  } catch (e) {
    status.className = "error"; status.textContent = "Error: " + e.message;
  } finally { $("generate").disabled = false; }
});
</script>
</body></html>
"""


def render_page(cfg: ServeConfig, api_root: str = "") -> str:
    config = {
        "api": f"{api_root}/v1/images/generations",
        "engine": cfg.engine if not cfg.sjd_window else f"torch + speculative Jacobi decoding (window {cfg.sjd_window})",
        "sizes": cfg.sizes,
        "defaults": cfg.defaults.model_dump(),
        "max_n": cfg.max_n,
        "max_prompt_chars": cfg.max_prompt_chars,
    }
    # "</" cannot end the script element early once escaped
    return PAGE.replace("__CONFIG__", json.dumps(config).replace("</", "<\\/"))


# -- the stage --------------------------------------------------------------------------------------


@register_stage("serve", ServeConfig, version=2, operational=("max_batch_size", "batch_wait_timeout_s"))
def run(ctx: StageContext) -> StageResult:
    import urllib.request

    cfg: ServeConfig = ctx.config
    checkpoint = resolve_checkpoint(cfg, ctx.run_dir, ctx.needs)
    read_checkpoint_meta(checkpoint)  # fail here, before Serve starts, on a missing checkpoint
    t0 = time.time()
    start(checkpoint, cfg, blocking=False, cpus=ctx.resources.cpus, gpus=ctx.resources.gpus,
          replicas=ctx.resources.concurrency)
    deploy_s = time.time() - t0
    ctx.log.info("serving %s (%s engine) at %s", checkpoint, cfg.engine, cfg.url)
    metrics: dict[str, Any] = {"url": cfg.url, "engine": cfg.engine, "deploy_s": round(deploy_s, 2)}
    if cfg.smoke_prompt:
        body = json.dumps({"prompt": cfg.smoke_prompt, "seed": 0}).encode()
        req = urllib.request.Request(f"{cfg.url}/v1/images/generations", data=body, headers={"Content-Type": "application/json"})
        t1 = time.time()
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.loads(r.read())
        metrics["smoke_latency_s"] = round(time.time() - t1, 3)
        with ctx.output("sample.png") as tmp:
            Path(tmp).write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))
    endpoint = {"url": cfg.url, "api": f"{cfg.url}/v1/images/generations", "app_name": cfg.app_name,
                "checkpoint": str(checkpoint), "engine": cfg.engine, "sizes": cfg.sizes}
    with ctx.output("endpoint.json") as tmp:
        Path(tmp).write_text(json.dumps(endpoint, indent=2) + "\n")
    return StageResult(metrics=metrics, artifacts=["endpoint.json", "sample.png"])
