"""`serve`: deploy a trained checkpoint with `simplear.serving` (HTTP API and page on Ray Serve), check it with
one request (kept as `sample.png`) and write `endpoint.json`. On a cluster the Serve app outlives the
stage's task; on the demo's embedded Ray it ends with the run (`simplear serve` keeps it up). The check
request carries one of the API keys where keys are configured; no key is written anywhere."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from simplear.serving.app import read_checkpoint_meta, resolve_checkpoint, start
from simplear.serving.auth import load_api_keys
from simplear.serving.config import ServeConfig
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.registry import register_stage


def send_check_request(api: str, prompt: str, key: str | None, timeout_s: float = 600, n: int = 1,
                       size: str | None = None, seed: int = 0) -> dict:
    """One generation request straight to the app, never through $http_proxy: a proxy would see the key and the
    answer, and one that cannot reach the app's loopback address would fail the stage."""
    import urllib.request

    body = json.dumps({"prompt": prompt, "seed": seed, "n": n, **({"size": size} if size else {})}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(urllib.request.Request(api, data=body, headers=headers), timeout=timeout_s) as r:
        return json.loads(r.read())


def check_at_full_load(api: str, cfg: ServeConfig, key: str | None) -> dict:
    """The stage's check: `max_batch_size` requests at once, each of `max_n` images at the largest size, so that a
    replica that cannot hold its configured load (the engine's batch, the decoder's memory) fails here and not on
    its first busy minute; the first answer."""
    from concurrent.futures import ThreadPoolExecutor

    largest = max(cfg.sizes, key=lambda s: (lambda w, h: w * h)(*map(int, s.split("x"))))
    with ThreadPoolExecutor(cfg.max_batch_size) as pool:
        answers = list(pool.map(lambda i: send_check_request(api, cfg.smoke_prompt, key, n=cfg.max_n, size=largest,
                                                             seed=i * cfg.max_n), range(cfg.max_batch_size)))
    return answers[0]


@register_stage("serve", ServeConfig, version=3,
                operational=("max_batch_size", "decode_batch", "batch_wait_timeout_s", "max_concurrent_requests", "retry_after_s",
                             "request_timeout_s", "max_body_bytes", "body_timeout_s", "replace_existing"), object_store=True)
def run(ctx: StageContext) -> StageResult:
    cfg: ServeConfig = ctx.config
    checkpoint = resolve_checkpoint(cfg, ctx.store.uri, ctx.needs)
    read_checkpoint_meta(checkpoint, cfg.visual_tokenizer)  # fail here, before Serve starts, on a missing checkpoint
    keys = load_api_keys(cfg)  # and on a host beyond loopback without a key
    t0 = time.time()
    served = start(checkpoint, cfg, keys, cpus=ctx.resources.cpus, gpus=ctx.resources.gpus,
                   replicas=ctx.resources.concurrency)
    deploy_s = time.time() - t0
    api = f"{served.url}/v1/images/generations"
    ctx.log.info("serving %s (%s engine) at %s", checkpoint, cfg.engine, served.url)
    metrics: dict[str, Any] = {"url": served.url, "engine": cfg.engine, "deploy_s": round(deploy_s, 2)}
    if cfg.smoke_prompt:
        t1 = time.time()
        answer = check_at_full_load(api, cfg, keys[0] if keys else None)
        metrics["smoke_latency_s"] = round(time.time() - t1, 3)
        metrics["smoke_images"] = cfg.max_batch_size * cfg.max_n
        with ctx.output("sample.png") as tmp:
            Path(tmp).write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))
    endpoint = {"url": served.url, "api": api, "app_name": cfg.app_name, "checkpoint": str(checkpoint),
                "engine": cfg.engine, "sizes": cfg.sizes, "auth": "bearer" if keys else None}
    with ctx.output("endpoint.json") as tmp:
        Path(tmp).write_text(json.dumps(endpoint, indent=2) + "\n")
    return StageResult(metrics=metrics, artifacts=["endpoint.json", "sample.png"])
