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

from simplear.serving import ServeConfig, load_api_keys, read_checkpoint_meta, resolve_checkpoint, start
from simplear.workflow.context import StageContext, StageResult
from simplear.workflow.registry import register_stage


@register_stage("serve", ServeConfig, version=3,
                operational=("max_batch_size", "batch_wait_timeout_s", "max_concurrent_requests", "retry_after_s",
                             "request_timeout_s", "max_body_bytes"))
def run(ctx: StageContext) -> StageResult:
    import urllib.request

    cfg: ServeConfig = ctx.config
    checkpoint = resolve_checkpoint(cfg, ctx.run_dir, ctx.needs)
    read_checkpoint_meta(checkpoint)  # fail here, before Serve starts, on a missing checkpoint
    keys = load_api_keys(cfg)  # and on a host beyond loopback without a key
    t0 = time.time()
    start(checkpoint, cfg, blocking=False, cpus=ctx.resources.cpus, gpus=ctx.resources.gpus,
          replicas=ctx.resources.concurrency)
    deploy_s = time.time() - t0
    ctx.log.info("serving %s (%s engine) at %s", checkpoint, cfg.engine, cfg.url)
    metrics: dict[str, Any] = {"url": cfg.url, "engine": cfg.engine, "deploy_s": round(deploy_s, 2)}
    if cfg.smoke_prompt:
        body = json.dumps({"prompt": cfg.smoke_prompt, "seed": 0}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {keys[0]}"} if keys else {})}
        req = urllib.request.Request(f"{cfg.url}/v1/images/generations", data=body, headers=headers)
        t1 = time.time()
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.loads(r.read())
        metrics["smoke_latency_s"] = round(time.time() - t1, 3)
        with ctx.output("sample.png") as tmp:
            Path(tmp).write_bytes(base64.b64decode(answer["data"][0]["b64_json"]))
    endpoint = {"url": cfg.url, "api": f"{cfg.url}/v1/images/generations", "app_name": cfg.app_name,
                "checkpoint": str(checkpoint), "engine": cfg.engine, "sizes": cfg.sizes,
                "auth": "bearer" if keys else None}
    with ctx.output("endpoint.json") as tmp:
        Path(tmp).write_text(json.dumps(endpoint, indent=2) + "\n")
    return StageResult(metrics=metrics, artifacts=["endpoint.json", "sample.png"])
