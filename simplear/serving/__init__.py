"""Serving: a trained checkpoint behind an HTTP API and a web page, on Ray Serve (engine vLLM or torch).

    POST /v1/images/generations   {"prompt", "n", "size", "guidance_scale", "seed", "temperature", "top_k",
                                   "top_p", "negative_prompt"} -> {"created", "data": [{"b64_json", "seed"}]}
    GET  /                        a page to type a prompt and see the images
    GET  /v1/health               {"status": "ok"}; with a key (any caller of an open API) also the engine, sizes,
                                  defaults, limits, queue and batching counters

The request and response follow OpenAI's images API (`response_format` b64_json only), so OpenAI's
clients work; errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 bad request,
401 missing or wrong API key (`auth`), 415 not JSON, 421 a Host that is not loopback on a loopback server
(`auth`), 408 body too slow, 413 body too long, 429 with Retry-After when the replica's queue is full and
504 past the request timeout (`limits`), 500 with nothing but the request id. Concurrent requests are
gathered by `serve.batch` into one engine call (per image size).

In a workflow the stage deploys the app, checks it with one request (the image is kept as
`sample.png`), writes `endpoint.json` and returns: on a cluster the Serve app outlives the stage's
task; on the demo's embedded Ray it ends with the run, so `simplear serve` is how a local user keeps
it up (it runs the same app in the foreground).
"""

from __future__ import annotations

import importlib

# Exported lazily: the workflow engine imports `auth` before Ray starts (take_api_keys_from_env) and must not
# import torch and transformers for it, which the app's modules do.
_EXPORTS = {"build_app": "app", "build_engine": "app", "read_checkpoint_meta": "app", "resolve_checkpoint": "app",
            "start": "app", "API_KEYS_ENV": "auth", "load_api_keys": "auth", "take_api_keys_from_env": "auth",
            "ServeConfig": "config", "render_page": "page"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
