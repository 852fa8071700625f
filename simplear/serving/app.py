"""The Ray Serve app: one engine per replica, requests gathered by `serve.batch` into one engine call."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simplear.serving.auth import (BearerAuth, host_header_is_loopback, is_loopback, key_digest, load_api_keys,
                                   refuse_open_api)
from simplear.sampling.spec import recorded_sampling
from simplear.serving.config import ImageRequest, RequestError, ServeConfig, error_body, parse_request, request_defaults
from simplear.serving.limits import Admission, BodyTooLarge, BodyTooSlow, deployment_limits, read_body
from simplear.serving.metrics import ServeMetrics
from simplear.serving.page import render_page

# Serve's replica logger: its records go to the replica's log file (logs/serve/) and stderr with the request id
# attached (the client's X-Request-Id, or one Serve's proxy made and returns in the response's X-Request-ID).
log = logging.getLogger("ray.serve")
deploy_log = logging.getLogger(__name__)  # start()'s, in the process that deploys


def read_checkpoint_meta(location: str | Path, visual_tokenizer=None) -> dict:
    """The checkpoint's simplear.json (a release's: described for `visual_tokenizer`); a URI's folder is fetched to
    this node first (then loaded from there)."""
    from simplear.model import checkpoint_meta
    from simplear.storage.staging import local_folder

    return checkpoint_meta(local_folder(location), visual_tokenizer)


def build_engine(location: str | Path, cfg: ServeConfig):
    """(a sampler with `generate_images(prompts, size=(H, W), params=[...])`: vLLM, torch or torch + SJD, what a
    request leaves out gets: the config's `sampling` over the checkpoint's recorded defaults)."""
    meta = read_checkpoint_meta(location, cfg.visual_tokenizer)
    defaults = cfg.sampling.over(recorded_sampling(meta))
    if defaults.mode == "reference" and (cfg.engine != "torch" or cfg.sjd_window):
        raise ValueError("sampling.mode reference runs on the torch engine only (engine: torch, no sjd_window)")
    return _engine(location, cfg, meta), defaults


def _engine(location: str | Path, cfg: ServeConfig, meta: dict):
    from simplear.storage.staging import local_folder
    from simplear.visual_tokenizers import VisualTokenizerConfig, load_visual_tokenizer

    checkpoint = local_folder(location)
    vt = load_visual_tokenizer(VisualTokenizerConfig.model_validate(meta["visual_tokenizer"]), decode_batch=cfg.decode_batch)
    for w, h in cfg.parsed_sizes():
        if w % vt.downsample or h % vt.downsample:
            raise ValueError(f"size {w}x{h} is not a multiple of the visual tokenizer's downsample {vt.downsample}")
    if cfg.engine == "vllm":
        from simplear.vllm_engine import VLLMSampler

        max_tokens = max((w // vt.downsample) * (h // vt.downsample) for w, h in cfg.parsed_sizes())
        return VLLMSampler(checkpoint, vt, cfg.vllm, max_text_tokens=cfg.max_text_tokens, max_image_tokens=max_tokens,
                           meta=meta)

    from simplear.devices import resolve_device, resolve_serving_dtype
    from simplear.model import load_checkpoint
    from simplear.sampler import TorchSampler

    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(checkpoint, device=device, dtype=resolve_serving_dtype(cfg.dtype, device),
                           visual_tokenizer=cfg.visual_tokenizer)
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


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


class ImageServer:
    """The Serve deployment (wrapped by `serve.deployment` in `build_app`): routing by path, the Host and key checks,
    the bounded queue and the timeouts, batching, the page. `config` is the config as served: its host is the one
    Serve's proxy listens on."""

    def __init__(self, checkpoint: str, config: dict, key_digests: list[str]):
        from ray import serve

        self.cfg = ServeConfig.model_validate(config)
        self.engine, self.defaults = build_engine(checkpoint, self.cfg)
        self.auth = BearerAuth(key_digests)
        self.loopback_only = is_loopback(self.cfg.host)
        self.metrics = ServeMetrics(self.cfg.app_name, serve.get_replica_context().replica_id.unique_id)
        self.admission = Admission(self.cfg.max_concurrent_requests, self.metrics.queue_depth.set)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch_requests": 0, "rejected_busy": 0,
                      "timed_out": 0}
        # Batching is set up per replica so that its size and wait come from the config.
        self._batched = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                    batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(self._run_batch)

    async def __call__(self, request):
        """Any failure answers a 500 that says nothing of it but the request id; the log has the rest."""
        try:
            return await self._answer(request)
        except Exception:  # noqa: BLE001 - an engine failure or a bug: the replica stays up
            request_id = request.headers.get("x-request-id", "")  # set by Serve's proxy when the client sent none
            log.exception("%s %s: failed", request.method, request.url.path)
            return _error(500, f"internal server error (request id {request_id}); the server's log has the details",
                          kind="server_error", code="internal_error")

    async def _answer(self, request):
        from starlette.responses import HTMLResponse, JSONResponse

        if self.loopback_only and not host_header_is_loopback(request.headers.get("host")):
            return _error(421, "this server listens on loopback: the Host header must name a loopback address "
                               "(127.0.0.1, localhost, [::1])", code="misdirected_request")
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
            return _error(status, msg, kind="not_found" if status == 404 else "method_not_allowed")
        if route == "page":
            html, headers = render_page(self.cfg, self.defaults, api_root=root.rstrip("/"), auth=self.auth.required)
            return HTMLResponse(html, headers=headers)
        if route == "health":
            return JSONResponse(self.health(detailed=self.auth.refusal(request.headers.get("authorization")) is None))
        return await self._generation(request)

    async def _generation(self, request):
        """401, 415, 413, 408, 400, 429, 504 or the images, in that order: a request is admitted to the queue only
        once it is known to be allowed and well formed, so the queue holds nothing but work. Only JSON is taken: a
        browser sends a cross-site JSON request only after a preflight, which this server never grants."""
        from starlette.responses import JSONResponse

        refusal = self.auth.refusal(request.headers.get("authorization"))
        if refusal:
            log.info("generation: 401 %s", refusal)
            return _error(401, refusal, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not _is_json(request.headers.get("content-type")):
            return _error(415, "the body must be JSON: send 'Content-Type: application/json'",
                          code="unsupported_media_type")
        try:
            body = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
            req, size = parse_request(body, self.cfg)
            job = self._job(req, size)
        except BodyTooLarge:
            return _error(413, f"the request body is larger than {self.cfg.max_body_bytes} bytes",
                          code="request_too_large")
        except BodyTooSlow:
            return _error(408, f"the request body did not arrive within body_timeout_s = {self.cfg.body_timeout_s} s",
                          code="request_timeout")
        except RequestError as e:
            return _error(400, str(e), e.param)
        except ValueError as e:
            return _error(400, str(e))
        if not self.admission.enter():
            self.stats["rejected_busy"] += 1
            log.info("generation: 429, %d requests queued", self.admission.depth)
            return _error(429, f"the server is busy ({self.admission.depth} requests queued); retry after "
                               f"{self.cfg.retry_after_s} s", kind="rate_limit_error", code="rate_limit_exceeded",
                          headers={"Retry-After": str(self.cfg.retry_after_s)})
        self.stats["requests"] += 1
        t0 = time.perf_counter()
        status, images = 500, []
        try:
            images = await asyncio.wait_for(self._batched(job), self.cfg.request_timeout_s)
            status = 200
        except asyncio.CancelledError:  # the client went away and Serve cancelled the request
            status = 499
            raise
        except TimeoutError:
            status = 504
            self.stats["timed_out"] += 1
            return _error(504, f"no answer within request_timeout_s = {self.cfg.request_timeout_s} s (waiting for a "
                               "batch and generating); retry, or ask for fewer images", kind="server_error",
                          code="timeout")
        finally:
            self.admission.leave()
            seconds = time.perf_counter() - t0
            self.metrics.answered(status, seconds, len(images))
            log.info("generation: %d, %d image(s) %dx%d in %.2f s", status, len(images), *job.size, seconds)
        data = [{"b64_json": b64, "seed": p.seed} for b64, p in zip(images, job.params)]
        return JSONResponse({"created": int(time.time()), "data": data})

    def health(self, detailed: bool) -> dict:
        """`detailed`: for a caller the API would take (with a key, or any on an open API): the engine, limits, queue
        and counters. Anyone else learns only that the server is up; no caller learns where the checkpoint is."""
        if not detailed:
            return {"status": "ok"}
        return {
            "status": "ok",
            "engine": self.cfg.engine if not self.cfg.sjd_window else f"torch+sjd(window={self.cfg.sjd_window})",
            "sizes": self.cfg.sizes,
            "defaults": request_defaults(self.defaults),
            "max_n": self.cfg.max_n,
            "max_prompt_chars": self.cfg.max_prompt_chars,
            "auth": self.auth.required,
            "limits": {"max_concurrent_requests": self.cfg.max_concurrent_requests,
                       "request_timeout_s": self.cfg.request_timeout_s, "max_body_bytes": self.cfg.max_body_bytes},
            "queue_depth": self.admission.depth,
            "stats": dict(self.stats),
        }

    def _job(self, req: ImageRequest, size: tuple[int, int]) -> _Job:
        base = req.sampling().over(self.defaults).params(None)
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


def build_app(checkpoint: str | Path, cfg: ServeConfig, api_keys: list[str], cpus: float = 1.0, gpus: float = 0.0,
              replicas: int = 1, env: dict[str, str] | None = None):
    """The bound Serve application (pass it to `serve.run`); no `api_keys`: an open API."""
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    env_vars = {"OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    actor_options["runtime_env"] = {"env_vars": env_vars}
    deployment = serve.deployment(
        ImageServer,
        name="ImageServer",
        num_replicas=replicas,
        ray_actor_options=actor_options,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=5,
        **deployment_limits(cfg),
    )
    return deployment.bind(str(checkpoint), cfg.model_dump(mode="json"), [key_digest(k) for k in api_keys])


def start(checkpoint: str | Path, cfg: ServeConfig, keys: list[str] | None = None, **app_kwargs) -> ServeConfig:
    """Start Serve's proxy on cfg.host:cfg.port (if Serve is not up yet) and run the app; returns the config as
    served, with the host and port the proxy really listens on. A running Serve keeps its proxy as it is (serve.start
    only logs a warning), so the rule that refuses an open API beyond loopback is applied to that host, read back
    from Serve's controller. `keys`: what the caller's `load_api_keys(cfg)` gave; None: loaded here, so that no
    path deploys without the rule. An app of the same name is replaced only where `cfg.replace_existing` says so."""
    from ray import serve
    from ray.serve.context import _get_global_client  # no public API reads the proxy's HTTP options back

    keys = load_api_keys(cfg) if keys is None else keys
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    listening = _get_global_client().http_config
    if listening.host is None:
        raise ValueError("Serve runs on this cluster with its HTTP proxy disabled: the app could not be reached")
    where = f"{listening.host}:{listening.port}"
    if (listening.host, listening.port) != (cfg.host, cfg.port):
        deploy_log.warning("Serve already runs on this cluster with its proxy on %s: the app is served there, not on "
                           "the configured %s:%s", where, cfg.host, cfg.port)
    refuse_open_api(listening.host, keys, f"Serve's proxy on this cluster listens on {where} (a running Serve keeps "
                                          f"its own; configured: {cfg.host}), which")
    existing = serve.status().applications.get(cfg.app_name)
    if existing is not None and not cfg.replace_existing:
        raise ValueError(f"a Serve app named {cfg.app_name!r} already runs on this cluster ({existing.status.value}): "
                         "refusing to replace it; set replace_existing: true (simplear serve: --replace-existing) to "
                         "deploy over it, or choose another app_name")
    served = cfg.model_copy(update={"host": listening.host, "port": listening.port})
    deploy_log.info("app %s on %s: %s", cfg.app_name, where,
                    f"{len(keys)} API key(s)" if keys else "no API key: the API is open (loopback only)")
    serve.run(build_app(checkpoint, served, keys, **app_kwargs), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return served


def resolve_checkpoint(cfg: ServeConfig, run: str | Path, needs: list[str] | None = None) -> str:
    """`checkpoint`, else `from_stage`'s final/ in the run dir (a path or a URI: each replica fetches a checkpoint
    on object storage to its node once)."""
    if cfg.checkpoint:
        return cfg.checkpoint
    if needs is not None and cfg.from_stage not in needs:
        raise ValueError(f"from_stage {cfg.from_stage!r} is not in the stage's needs {needs}: add it or set checkpoint")
    return f"{str(run).rstrip('/')}/{cfg.from_stage}/final"
