"""The serve stage: config rules, the HTTP API (schema and every error), batching of concurrent requests,
the vLLM engine behind Serve, the stage run and `simplear serve` (auth, limits and the fuzz test:
tests/test_serve_hardening.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from conftest import ROOT
from serve_support import deployed, write_keys
from simplear.config import describe_validation_error
from simplear.serving import ServeConfig, render_page

API = "/v1/images/generations"


def post(app, body, raw: bytes | None = None, timeout: float = 120):
    data = raw if raw is not None else json.dumps(body)
    return requests.post(app.url + API, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


# -- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, where", [
    ({"sizes": ["64"]}, "sizes"),
    ({"sizes": []}, "sizes"),
    ({"engine": "vllm", "sjd_window": 8}, "sjd_window"),
    ({"engine": "vllm", "dtype": "bfloat16"}, "vllm.dtype"),
    ({"route_prefix": "api"}, "route_prefix"),
    ({"port": 0}, "port"),
    ({"max_n": 0}, "max_n"),
    ({"vllm": {"max_num_seqs": 1}}, "vllm.max_num_seqs"),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p"),
    ({"sampling": {"prompt_template": "no slot"}}, "sampling.prompt_template"),
    ({"defaults": {"guidance_scale": 6.0}}, "defaults: unknown key"),  # the HTTP name is for requests only
    ({"batch_size": 4}, "batch_size: unknown key"),
    ({"vllm": {"max_image_tokens": 64}}, "vllm.max_image_tokens: unknown key"),
    ({"max_batch_size": 16, "max_concurrent_requests": 8}, "max_concurrent_requests (8) is below max_batch_size"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"retry_after_s": 0.5}, "retry_after_s"),
    ({"max_body_bytes": 100}, "max_body_bytes"),
    ({"api_keys": ["k"]}, "api_keys: unknown key"),  # keys never sit in a config; a file or the env holds them
])
def test_config_rules(bad, where):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ServeConfig.model_validate(bad)
    assert where in "\n".join(describe_validation_error(e.value))


def test_defaults_bind_loopback_and_pick_vllm():
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.engine == "vllm" and cfg.from_stage == "grpo"
    assert ServeConfig(host="0.0.0.0", port=9000, route_prefix="/img/").url == "http://127.0.0.1:9000/img"


def test_torch_engine_weights_dtype(tmp_path):
    """bf16 weights only where asked or on a GPU by default; fp32 on CPU, even for a checkpoint saved in bf16 (a
    release, an export), and whatever the training checkpoint's fp32 on a GPU."""
    import torch

    from serve_support import make_checkpoint
    from simplear.devices import resolve_serving_dtype
    from simplear.serving import build_engine

    ckpt = make_checkpoint(tmp_path / "ckpt", layers=1)
    dtype = lambda engine: next(engine.model.parameters()).dtype  # noqa: E731
    assert dtype(build_engine(ckpt, ServeConfig(engine="torch", sizes=["32x32"], device="cpu"))[0]) == torch.float32
    engine, _ = build_engine(ckpt, ServeConfig(engine="torch", sizes=["32x32"], device="cpu", dtype="bfloat16"))
    assert dtype(engine) == torch.bfloat16
    assert engine.generate_codes(["a red circle"], (4, 4)).shape == (1, 4, 4)
    assert resolve_serving_dtype("auto", torch.device("cuda")) == torch.bfloat16
    from simplear.release import export_release

    saved_bf16 = export_release(ckpt, tmp_path / "release")  # a release as published, read with its tokenizer
    engine, _ = build_engine(saved_bf16, ServeConfig(engine="torch", sizes=["32x32"], device="cpu",
                                                     visual_tokenizer={"kind": "pixel-fsq", "levels": 4}))
    assert dtype(engine) == torch.float32


def test_no_decode_call_exceeds_the_bound_at_the_replicas_full_load(tmp_path):
    """max_batch_size 16 requests of max_n 4 images at 1024x1024 (64 images in one engine call), the engine's codes
    made at once: the visual tokenizer is called for at most decode_batch (8) of them at a time; 64x64 images,
    256 times smaller, go in one call."""
    import torch

    from serve_support import make_checkpoint
    from simplear.sampler import SamplingParams
    from simplear.serving import build_engine
    from simplear.serving.app import ImageServer, _Job

    cfg = ServeConfig(engine="torch", sizes=["1024x1024", "64x64"], device="cpu", max_batch_size=16, max_n=4)
    engine, _ = build_engine(make_checkpoint(tmp_path / "ckpt", layers=1), cfg)
    vt, calls = engine.visual_tokenizer, []
    decode_chunk = vt._decode
    vt._decode = lambda codes: calls.append(len(codes)) or decode_chunk(codes)
    engine.generate_codes = lambda prompts, grid, params=None: torch.randint(0, 64, (len(prompts), *grid))
    server = object.__new__(ImageServer)
    server.engine = engine
    jobs = [_Job(["a red circle"] * cfg.max_n, (1024, 1024), [SamplingParams(seed=i)] * cfg.max_n)
            for i in range(cfg.max_batch_size)]
    answers = server._generate(jobs + [_Job(["a"] * 4, (64, 64), [SamplingParams()] * 4)])
    assert [len(a) for a in answers] == [4] * 17
    assert calls == [cfg.decode_batch] * 8 + [4] and cfg.decode_batch == 8


def test_page_escapes_its_config():
    from simplear.sampling.spec import DEFAULT_SAMPLING, SamplingSpec

    page, _ = render_page(ServeConfig(sizes=["64x64"]), DEFAULT_SAMPLING, api_root="/x")
    assert '"/x/v1/images/generations"' in page and "<form" in page and '"auth": false' in page
    assert '"auth": true' in render_page(ServeConfig(), DEFAULT_SAMPLING, auth=True)[0]
    assert "</script><script>" not in render_page(ServeConfig(sizes=["64x64"]), DEFAULT_SAMPLING,
                                                  api_root="/</script><script>")[0]
    # the defaults come from the checkpoint's simplear.json, which someone else may have written
    hostile = SamplingSpec(negative_prompt="</script><script>alert(1)</script>")
    page, _ = render_page(ServeConfig(), hostile.over(DEFAULT_SAMPLING))
    assert "</script><script>alert" not in page and '"guidance_scale": 1.5' in page


def test_stage_is_registered():
    from simplear.workflow.registry import get_stage_kind

    kind = get_stage_kind("serve")
    assert kind.config is ServeConfig


# -- the API (torch engine) -------------------------------------------------------------------------


def test_generation_schema(serve_torch_app):
    r = post(serve_torch_app, {"prompt": "a red circle on a blue background", "n": 2, "size": "64x64", "seed": 7,
                               "guidance_scale": 2.0, "temperature": 0.9, "top_k": 20, "top_p": 0.95})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert abs(body["created"] - time.time()) < 600
    assert len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [7, 8]  # one repeatable seed per image
    for d in body["data"]:
        assert set(d) == {"b64_json", "seed"}
        img = png(d["b64_json"])
        assert img.size == (64, 64) and img.mode == "RGB"
    # same seed, same image; the default size is the first configured one
    again = post(serve_torch_app, {"prompt": "a red circle on a blue background", "size": "64x64", "seed": 7,
                                   "guidance_scale": 2.0, "temperature": 0.9, "top_k": 20, "top_p": 0.95}).json()
    assert again["data"][0]["b64_json"] == body["data"][0]["b64_json"]
    small = post(serve_torch_app, {"prompt": "green", "model": "simplear", "user": "me", "response_format": "b64_json"})
    assert small.status_code == 200 and png(small.json()["data"][0]["b64_json"]).size == (32, 32)
    assert isinstance(small.json()["data"][0]["seed"], int)


BAD_REQUESTS = [
    ("malformed JSON", None, b'{"prompt": "a red', "malformed JSON"),
    ("not an object", ["a red circle"], None, "JSON object"),
    ("no prompt", {"n": 1}, None, "prompt: Field required"),
    ("empty prompt", {"prompt": ""}, None, "prompt must not be empty"),
    ("blank prompt", {"prompt": "   \n"}, None, "prompt must not be empty"),
    ("oversized prompt", {"prompt": "x" * 201}, None, "longer than 200 characters"),
    ("oversized negative prompt", {"prompt": "a", "negative_prompt": "x" * 201}, None, "negative_prompt is longer"),
    ("prompt not a string", {"prompt": 5}, None, "prompt: Input should be a valid string"),
    ("n zero", {"prompt": "a", "n": 0}, None, "n: Input should be greater than or equal to 1"),
    ("n too large", {"prompt": "a", "n": 5}, None, "n must be at most 4"),
    ("n fractional", {"prompt": "a", "n": 1.5}, None, "n: Value error, must be an integer"),
    ("n as a string", {"prompt": "a", "n": "2"}, None, "n: Value error, must be a number"),
    ("unsupported size", {"prompt": "a", "size": "512x512"}, None, "unsupported size '512x512'"),
    ("malformed size", {"prompt": "a", "size": "big"}, None, "unsupported size 'big'"),
    ("negative guidance", {"prompt": "a", "guidance_scale": -1}, None, "guidance_scale: Input should be greater than or equal to 0"),
    ("huge guidance", {"prompt": "a", "guidance_scale": 1e9}, None, "guidance_scale: Input should be less than or equal to 50"),
    ("negative temperature", {"prompt": "a", "temperature": -0.1}, None, "temperature: Input should be greater than or equal to 0"),
    ("top_k zero", {"prompt": "a", "top_k": 0}, None, "top_k: Input should be greater than or equal to 1"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, None, "top_p: Input should be greater than 0"),
    ("top_p above one", {"prompt": "a", "top_p": 1.01}, None, "top_p: Input should be less than or equal to 1"),
    ("negative seed", {"prompt": "a", "seed": -3}, None, "seed: Input should be greater than or equal to 0"),
    ("seed as bool", {"prompt": "a", "seed": True}, None, "seed: Value error, must be a number"),
    ("url format", {"prompt": "a", "response_format": "url"}, None, "response_format: Input should be 'b64_json'"),
    ("unknown parameter", {"prompt": "a", "quality": "hd"}, None, "quality: unknown parameter"),
]


@pytest.mark.parametrize("name, body, raw, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_with_a_message(serve_torch_app, name, body, raw, message):
    r = post(serve_torch_app, body, raw=raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_routes(serve_torch_app):
    page = requests.get(serve_torch_app.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/v1/images/generations" in page.text
    health = requests.get(serve_torch_app.url + "/v1/health", timeout=30).json()  # an open API: the details
    assert health["engine"] == "torch" and health["sizes"] == ["32x32", "64x64"] and health["max_n"] == 4
    assert str(serve_torch_app.checkpoint) not in json.dumps(health)
    assert requests.get(serve_torch_app.url + API, timeout=30).status_code == 405
    assert requests.get(serve_torch_app.url + "/nope", timeout=30).status_code == 404


def test_concurrent_requests_are_batched(serve_torch_app):
    url = serve_torch_app.url
    before = requests.get(url + "/v1/health", timeout=30).json()["stats"]
    prompts = [f"a {c} square on a white background" for c in ["red", "green", "blue", "yellow", "pink", "black"]]
    bodies = [{"prompt": p, "seed": i, "size": "32x32", "n": 1 + i % 2} for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(serve_torch_app, b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert [len(a.json()["data"]) for a in answers] == [b["n"] for b in bodies]
    after = requests.get(url + "/v1/health", timeout=30).json()["stats"]
    assert after["requests"] - before["requests"] == len(bodies)
    assert after["batches"] - before["batches"] < len(bodies)  # some requests shared an engine call
    assert after["max_batch_requests"] > 1
    # a request's images do not depend on what it was batched with
    alone = post(serve_torch_app, bodies[3]).json()
    assert alone["data"][0]["b64_json"] == answers[3].json()["data"][0]["b64_json"]


# -- the vLLM engine behind Serve -------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_vllm_app(serve_torch_app):
    """The same checkpoint on the vLLM engine, as a second app (route prefix /vllm) on the same Serve."""
    with deployed(serve_torch_app, "vllm", engine="vllm", vllm={"max_num_seqs": 8, "kv_cache_gib": 0.25}) as app:
        yield app


def test_vllm_app_serves_and_matches_the_torch_app(serve_vllm_app, serve_torch_app):
    health = requests.get(serve_vllm_app.url + "/v1/health", timeout=30).json()
    assert health["engine"] == "vllm"
    greedy = {"prompt": "a red circle on a blue background", "size": "64x64", "temperature": 0, "n": 2}
    bodies = [greedy, {**greedy, "guidance_scale": 3.0, "negative_prompt": "a green square"},
              {"prompt": "yellow", "size": "32x32", "seed": 4, "top_k": 10}]
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: one batch, two sizes
        answers = list(pool.map(lambda b: post(serve_vllm_app, b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert png(answers[2].json()["data"][0]["b64_json"]).size == (32, 32)
    for body, answer in zip(bodies[:2], answers[:2]):
        from_torch = post(serve_torch_app, body).json()["data"]
        assert [d["b64_json"] for d in answer.json()["data"]] == [d["b64_json"] for d in from_torch]  # same pixels
    assert post(serve_vllm_app, {"prompt": ""}).status_code == 400


# -- the stage and the CLI --------------------------------------------------------------------------


def test_stage_deploys_checks_and_returns(serve_torch_app, tmp_path, monkeypatch):
    """The serve stage run by the workflow engine (a Ray task): deploys with API keys, checks one request (with
    a key), records, returns; the keys are in no file of the run. One key comes from $SIMPLEAR_API_KEYS, which
    the driver took out of its environment as before Ray starts: it reaches the stage with its config."""
    import yaml
    from ray import serve

    from simplear.serving import API_KEYS_ENV, auth
    from simplear.workflow.engine import run_workflow, select
    from simplear.workflow.spec import load_workflow

    key, env_key = "stage-" + secrets.token_hex(16), "stage-env-" + secrets.token_hex(16)
    monkeypatch.setattr(auth, "_taken_from_env", [])
    monkeypatch.setenv(API_KEYS_ENV, env_key)
    auth.take_api_keys_from_env()  # what engine.connect_ray does before ray.init
    assert API_KEYS_ENV not in os.environ
    config = {"checkpoint": str(serve_torch_app.checkpoint), "engine": "torch", "port": serve_torch_app.port,
              "app_name": "stage", "route_prefix": "/stage", "sizes": ["32x32", "16x16"], "max_batch_size": 3, "max_n": 2,
              "api_keys_file": write_keys(tmp_path / "keys", key)}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(
        {"run_dir": "run", "stages": {"serve": {"uses": "serve", "config": config, "resources": {"cpus": 0}}}}))
    wf = load_workflow(tmp_path / "w.yaml")
    statuses = run_workflow(wf, select(wf))
    assert statuses["serve"].state == "done"
    manifest = statuses["serve"].manifest
    assert sorted(o["path"] for o in manifest["outputs"]) == ["endpoint.json", "sample.png"]
    assert manifest["metrics"]["smoke_latency_s"] > 0 and manifest["metrics"]["url"].endswith("/stage")
    assert manifest["metrics"]["smoke_images"] == 6  # the check: the replica's full load, 3 requests x 2 images
    stage_dir = tmp_path / "run" / "serve"
    endpoint = json.loads((stage_dir / "endpoint.json").read_text())
    assert endpoint["url"] == f"http://127.0.0.1:{serve_torch_app.port}/stage" and endpoint["auth"] == "bearer"
    assert endpoint["checkpoint"] == str(serve_torch_app.checkpoint)
    assert Image.open(stage_dir / "sample.png").size == (32, 32)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and (key.encode() in p.read_bytes()
                                                                              or env_key.encode() in p.read_bytes())]
    # the app outlives the stage's task, under its own route prefix, wants a key, and its page calls its own API
    assert requests.post(endpoint["api"], json={"prompt": "a blue disc"}, timeout=120).status_code == 401
    for k in (key, env_key):
        r = requests.post(endpoint["api"], json={"prompt": "a blue disc"}, headers={"Authorization": f"Bearer {k}"},
                          timeout=120)
        assert r.status_code == 200
    assert '"/stage/v1/images/generations"' in requests.get(endpoint["url"], timeout=30).text
    serve.delete("stage")


def test_stage_refuses_to_serve_beyond_loopback_without_a_key(serve_torch_app, tmp_path, monkeypatch):
    import yaml

    from simplear.serving import API_KEYS_ENV
    from simplear.workflow.engine import RunFailed, run_workflow, select
    from simplear.workflow.manifest import FAILED
    from simplear.workflow.spec import load_workflow

    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    config = {"checkpoint": str(serve_torch_app.checkpoint), "engine": "torch", "host": "0.0.0.0", "app_name": "open"}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(
        {"run_dir": "run", "stages": {"serve": {"uses": "serve", "config": config, "resources": {"cpus": 0}}}}))
    wf = load_workflow(tmp_path / "w.yaml")
    with pytest.raises(RunFailed, match="serve"):
        run_workflow(wf, select(wf))
    assert "host 0.0.0.0 is beyond loopback and no API key is configured" in (tmp_path / "run" / "serve" / FAILED).read_text()


def test_stage_needs_its_checkpoint_stage(tmp_path):
    from simplear.serving import resolve_checkpoint

    with pytest.raises(ValueError, match="from_stage 'grpo' is not in the stage's needs"):
        resolve_checkpoint(ServeConfig(), tmp_path, needs=["sft"])
    assert resolve_checkpoint(ServeConfig(from_stage="sft"), tmp_path, needs=["sft"]) == f"{tmp_path}/sft/final"


def test_cli_serve_runs_in_the_foreground(serve_torch_app, ray_head):
    """`simplear serve --model CKPT --address ...` adds its app to the cluster, answers, and removes it on Ctrl-C."""
    port = serve_torch_app.port  # Serve's proxy is already up on this cluster
    env = {**ray_head.env, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "simplear.cli", "serve", "--model", str(serve_torch_app.checkpoint), "--engine", "torch",
           "--port", str(port), "--address", ray_head.address, "--app-name", "cli", "--route-prefix", "/cli"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/cli"
    try:
        lines = []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines[-40:])
        assert f"{url}/" in lines[-1]
        r = requests.post(url + API, json={"prompt": "a red circle", "size": "64x64"}, timeout=120)
        assert r.status_code == 200 and png(r.json()["data"][0]["b64_json"]).size == (64, 64)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert requests.get(url + "/", timeout=30).status_code == 404  # its app is gone
        assert requests.get(serve_torch_app.url + "/v1/health", timeout=30).status_code == 200  # the others stay
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_cli_serve_errors(tmp_path, capsys, monkeypatch):
    from simplear.cli import main
    from simplear.serving import API_KEYS_ENV

    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    assert main(["serve", "--model", str(tmp_path), "--engine", "torch", "--host", "0.0.0.0"]) == 2
    assert "beyond loopback and no API key is configured" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--engine", "torch", "--api-keys-file", str(tmp_path / "nope")]) == 2
    assert "api_keys_file" in capsys.readouterr().err

    assert main(["serve", "--model", str(tmp_path / "missing"), "--engine", "torch"]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm", "--sjd-window", "4"]) == 2
    assert "sjd_window" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert main(["serve", str(ROOT / "tests" / "engine_workflow.yaml")]) == 2
    assert "no stage of kind serve" in capsys.readouterr().err
