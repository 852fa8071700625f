"""Serving: a trained checkpoint behind an HTTP API and a web page, on Ray Serve (engine vLLM or torch).

    POST /v1/images/generations   {"prompt", "n", "size", "guidance_scale", "seed", "temperature", "top_k",
                                   "top_p", "negative_prompt"} -> {"created", "data": [{"b64_json", "seed"}]}
    GET  /                        a page to type a prompt and see the images
    GET  /v1/health               engine, checkpoint, sizes, defaults, limits, batching counters

The request and response follow OpenAI's images API (`response_format` b64_json only), so OpenAI's
clients work; errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 bad request,
401 missing or wrong API key (`auth`), 413 body too long, 429 with Retry-After when the replica's
queue is full and 504 past the request timeout (`limits`). Concurrent requests are gathered by
`serve.batch` into one engine call (per image size).

In a workflow the stage deploys the app, checks it with one request (the image is kept as
`sample.png`), writes `endpoint.json` and returns: on a cluster the Serve app outlives the stage's
task; on the demo's embedded Ray it ends with the run, so `simplear serve` is how a local user keeps
it up (it runs the same app in the foreground).
"""

from simplear.serving.app import build_app, build_engine, read_checkpoint_meta, resolve_checkpoint, start
from simplear.serving.auth import API_KEYS_ENV, load_api_keys
from simplear.serving.config import ServeConfig
from simplear.serving.page import render_page

__all__ = ["API_KEYS_ENV", "ServeConfig", "build_app", "build_engine", "load_api_keys", "read_checkpoint_meta", "render_page",
           "resolve_checkpoint", "start"]
