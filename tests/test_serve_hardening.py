"""The hardened API: API keys (the rule, applied to the host Serve's proxy really listens on; the Bearer check;
OpenAI's own client; keys out of Ray's environment), an app of the same name not replaced, the Host check on
loopback, JSON only, the page's policy headers, a minimal health route, generic 500s, the bounded queue (429
with Retry-After before Ray Serve says anything), the request and body timeouts (504, 408), request ids in the
replica's log, our metrics next to Ray Serve's, and a seeded fuzz test that finds no 5xx but the documented 504."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import ROOT, free_port, stop_ray_by_temp_dir
from serve_support import ENGINE_SECRET, deployed, deployed_failing, write_keys
from simplear.serving import API_KEYS_ENV, ServeConfig, load_api_keys, start

API = "/v1/images/generations"
KEY = "sk-test-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def keyed_app(serve_torch_app, tmp_path_factory):
    """The torch app with an API key (from a file) and a queue of 2 requests per replica."""
    keys = write_keys(tmp_path_factory.mktemp("keys") / "api_keys", "sk-other-key", KEY)
    with deployed(serve_torch_app, "keyed", api_keys_file=keys, max_concurrent_requests=2, max_batch_size=2,
                  retry_after_s=3) as app:
        yield app


def post(app, body=None, raw: bytes | None = None, key: str | None = KEY, headers: dict | None = None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return requests.post(app.url + API, data=raw if raw is not None else json.dumps(body), headers=headers, timeout=120)


def png_size(b64: str) -> tuple[int, int]:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img.size


# -- keys -------------------------------------------------------------------------------------------


def test_keys_come_from_the_env_and_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEYS_ENV, " a1, ,b2 ")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n\n  c3  \nd4\n")
    assert load_api_keys(ServeConfig(api_keys_file=str(keys_file))) == ["a1", "b2", "c3", "d4"]
    monkeypatch.delenv(API_KEYS_ENV)
    assert load_api_keys(ServeConfig(host="0.0.0.0", api_keys_file=str(keys_file))) == ["c3", "d4"]
    with pytest.raises(ValueError, match="api_keys_file .*missing: No such file"):
        load_api_keys(ServeConfig(api_keys_file=str(tmp_path / "missing")))
    keys_file.write_text("# no key yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(ServeConfig(api_keys_file=str(keys_file)))


@pytest.mark.parametrize("host, needs_key", [
    ("127.0.0.1", False), ("::1", False), ("localhost", False), ("127.0.0.2", False),
    ("0.0.0.0", True), ("::", True), ("10.0.0.7", True), ("head.example.com", True),
])
def test_a_host_beyond_loopback_needs_a_key(host, needs_key, monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    cfg = ServeConfig(host=host)
    if needs_key:
        with pytest.raises(ValueError, match=f"host {re.escape(host)} is beyond loopback and no API key is configured"):
            load_api_keys(cfg)
        monkeypatch.setenv(API_KEYS_ENV, "k")
    assert load_api_keys(cfg) == (["k"] if needs_key else [])


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    keys_file = write_keys(tmp_path / "keys", "k1")
    os.chmod(keys_file, 0o644)
    with caplog.at_level(logging.WARNING, logger="simplear.serving.auth"):
        assert load_api_keys(ServeConfig(api_keys_file=keys_file)) == ["k1"]
    assert f"api_keys_file {keys_file} is readable by other users (mode 644)" in caplog.text
    caplog.clear()
    os.chmod(keys_file, 0o600)
    with caplog.at_level(logging.WARNING, logger="simplear.serving.auth"):
        load_api_keys(ServeConfig(api_keys_file=keys_file))
    assert not caplog.records


def test_api_keys_leave_the_environment_before_ray_starts(monkeypatch):
    """The driver's $SIMPLEAR_API_KEYS is gone when ray.init runs (an embedded Ray's workers inherit the driver's
    environment) and is not in what ray.init gets; the driver still has the keys, and a ServeConfig pickled for
    a task carries them (tests/test_serve.py::test_stage_deploys_checks_and_returns deploys with one)."""
    import pickle

    import ray

    from simplear.serving import auth
    from simplear.workflow.engine import connect_ray
    from simplear.workflow.spec import RaySettings

    class Started(Exception):
        pass

    def init(*args, **kwargs):
        seen.update(env=os.environ.get(API_KEYS_ENV), args=repr((args, kwargs)))
        raise Started

    seen: dict = {}
    monkeypatch.setattr(auth, "_taken_from_env", [])
    monkeypatch.setenv(API_KEYS_ENV, "sk-env-1, sk-env-2")
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        m.setattr(ray, "init", init)
        with pytest.raises(Started):
            connect_ray(RaySettings(address="127.0.0.1:1"), metadata={}, extra_sys_path=[])
    assert seen["env"] is None and "sk-env" not in seen["args"] and API_KEYS_ENV not in os.environ
    cfg = ServeConfig(host="0.0.0.0")
    assert load_api_keys(cfg) == ["sk-env-1", "sk-env-2"]
    sent = pickle.dumps(cfg)
    monkeypatch.setattr(auth, "_taken_from_env", [])  # as in the task's process
    with pytest.raises(ValueError, match="beyond loopback and no API key"):
        load_api_keys(cfg)
    assert load_api_keys(pickle.loads(sent)) == ["sk-env-1", "sk-env-2"]
    assert "sk-env" not in json.dumps(pickle.loads(sent).model_dump(mode="json"))  # never in a manifest


# The probe of issue 19: a cluster's Serve already listens on 0.0.0.0 (set up by its operator); an app deployed
# with the default host and no key used to go out, unauthenticated, on that proxy (serve.start only warned).
PROBE = """
import sys

import ray
from ray import serve

from simplear.serving import ServeConfig, start

port, checkpoint, temp_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=temp_dir)
serve.start(http_options={"host": "0.0.0.0", "port": port})
try:
    start(checkpoint, ServeConfig(engine="torch", port=port, smoke_prompt=None), cpus=0)
    print("DEPLOYED")
except ValueError as e:
    print("REFUSED", e)
print("APPS", sorted(serve.status().applications))
"""


def test_the_probe_an_open_app_onto_a_serve_that_listens_beyond_loopback_is_refused(serve_torch_app):
    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="/tmp/srp-")
    env = {k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, "RAY_ADDRESS")}
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(port), str(serve_torch_app.checkpoint), temp_dir],
                             cwd=ROOT, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                             timeout=180)
    finally:
        stop_ray_by_temp_dir(temp_dir)
    refusal = (f"REFUSED Serve's proxy on this cluster listens on 0.0.0.0:{port} (a running Serve keeps its own; "
               "configured: 127.0.0.1), which is beyond loopback and no API key is configured")
    assert refusal in out.stdout, out.stdout + out.stderr[-3000:]
    assert "APPS []" in out.stdout


def test_an_app_goes_where_the_proxy_listens_and_replaces_one_of_its_name_only_when_told(keyed_app, slow_app):
    """The keyed app is not replaced by an open one of the same name; with replace_existing the slow app is, and the
    config as served names the proxy's real host and port, not the configured ones."""
    open_keyed = ServeConfig.model_validate({**keyed_app.config.model_dump(), "api_keys_file": None})
    with pytest.raises(ValueError, match="a Serve app named 'keyed' already runs on this cluster \\(RUNNING\\): "
                                         "refusing to replace it"):
        start(keyed_app.checkpoint, open_keyed, cpus=0)
    assert post(keyed_app, {"prompt": "a red circle"}, key=None).status_code == 401  # still the keyed one
    elsewhere = {**slow_app.config.model_dump(), "host": "localhost", "port": free_port(), "max_n": 1}
    with pytest.raises(ValueError, match="a Serve app named 'slow' already runs"):
        start(slow_app.checkpoint, ServeConfig.model_validate(elsewhere), cpus=0)
    served = start(slow_app.checkpoint, ServeConfig.model_validate({**elsewhere, "replace_existing": True}), cpus=0)
    assert (served.host, served.port) == ("127.0.0.1", slow_app.port) and served.url == slow_app.url
    r = post(slow_app, {"prompt": "a red circle", "n": 2}, key=None)
    assert r.status_code == 400 and "n must be at most 1" in r.json()["error"]["message"]  # the new config answers


# -- what the API and the page give away ------------------------------------------------------------


def test_health_tells_a_caller_without_a_key_only_that_it_is_up(keyed_app, serve_torch_app):
    assert health(keyed_app) == {"status": "ok"} and health(keyed_app, "sk-wrong") == {"status": "ok"}
    full = health(keyed_app, KEY)
    assert full["auth"] is True and full["limits"]["max_concurrent_requests"] == 2 and "stats" in full
    opened = health(serve_torch_app)  # an open API: any caller may pass
    assert opened["auth"] is False and opened["engine"] == "torch"
    for answer in (full, opened):
        assert "checkpoint" not in answer and str(serve_torch_app.checkpoint) not in json.dumps(answer)


def test_a_500_tells_the_client_only_the_request_id(serve_torch_app, ray_head):
    with deployed_failing(serve_torch_app, "failing") as url:
        r = requests.post(url + API, json={"prompt": "a red circle", "size": "32x32"}, timeout=60)
    request_id = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json()["error"] == {
        "message": f"internal server error (request id {request_id}); the server's log has the details",
        "type": "server_error", "param": None, "code": "internal_error"}
    assert ENGINE_SECRET not in r.text and "RuntimeError" not in r.text
    logs = Path(ray_head.temp_dir) / "session_latest" / "logs" / "serve"
    deadline = time.time() + 20
    while time.time() < deadline:  # the details are in the replica's log, under the request id
        text = "".join(f.read_text(errors="replace") for f in logs.glob("replica_failing_*.log"))
        if re.search(rf" {request_id} .*POST /failing{API}: failed", text) and ENGINE_SECRET in text:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no log line for {request_id} with the engine's error")


def test_only_json_bodies_are_taken(keyed_app):
    """A form or text/plain POST is what a page of another site can send without a CORS preflight."""
    body = json.dumps({"prompt": "a red circle", "size": "32x32"})
    for content_type in [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                         "application/jsonp"]:
        headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
        r = requests.post(keyed_app.url + API, data=body, headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (content_type, r.text)
    assert post(keyed_app, raw=body.encode(), headers={"Content-Type": "Application/JSON; charset=utf-8"}).ok


def test_a_host_that_is_not_loopback_is_refused_on_loopback(serve_torch_app):
    """DNS rebinding: a site whose name resolves to 127.0.0.1 makes the browser send its own name as the Host."""
    port = serve_torch_app.port
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "10.0.0.7", f"[::1:{port}"]:
        for method, path in [("GET", "/"), ("GET", "/v1/health"), ("POST", API)]:
            r = requests.request(method, serve_torch_app.url + path, headers={"Host": host}, json={"prompt": "a"},
                                 timeout=30)
            assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_request", (host, path)
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.2"]:
        assert requests.get(serve_torch_app.url + "/v1/health", headers={"Host": host}, timeout=30).ok, host


def test_the_page_runs_only_its_own_script_and_style_and_in_no_frame(keyed_app):
    r = requests.get(keyed_app.url + "/", timeout=30)
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))

    def allowed(text: str) -> str:
        return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"

    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    styles = re.findall(r"<style>(.*?)</style>", r.text, re.S)
    assert len(scripts) == 1 and len(styles) == 1 and r.text.count("<script") == 1
    assert not re.search(r"\s(on\w+|style)=", r.text)  # no inline handler or style attribute the policy would block
    assert policy == {"default-src": "'none'", "script-src": allowed(scripts[0]), "style-src": allowed(styles[0]),
                      "img-src": "data:", "connect-src": "'self'", "form-action": "'none'", "base-uri": "'none'",
                      "frame-ancestors": "'none'"}


# -- limits -----------------------------------------------------------------------------------------


def test_a_body_that_trickles_in_gets_408(slow_app):
    """Half a body, then nothing: the replica answers at body_timeout_s (1 s) and frees the request's slot."""
    head = (f"POST /slow{API} HTTP/1.1\r\nHost: 127.0.0.1:{slow_app.port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{\"prompt\": ")
    with socket.create_connection(("127.0.0.1", slow_app.port), timeout=30) as conn:
        t0 = time.time()
        conn.sendall(head.encode())
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        elapsed = time.time() - t0
        error = json.loads(answer.read())["error"]
    assert answer.status == 408 and error["code"] == "request_timeout" and "body_timeout_s = 1.0 s" in error["message"]
    assert 0.9 < elapsed < 10
    assert health(slow_app)["queue_depth"] == 0


def test_the_check_request_bypasses_proxies(serve_torch_app, monkeypatch):
    """The serve stage's check request carries a key: an $http_proxy must not see it (nor break the check)."""
    from stages.serve import send_check_request

    seen = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            self.send_error(502)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for var in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.server_port}")
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(urllib.error.HTTPError, match="502"):  # a plain request goes through the proxy
            # (a new opener: urlopen's global one would keep this proxy for the rest of the session)
            urllib.request.build_opener().open(serve_torch_app.url + "/v1/health", timeout=30)
        assert len(seen) == 1
        answer = send_check_request(serve_torch_app.url + API, "a red circle", key="sk-for-the-app-only", timeout_s=60)
        assert png_size(answer["data"][0]["b64_json"]) == (32, 32) and len(seen) == 1
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_serve_limits_sit_behind_ours():
    """Serve sends a replica more than it admits and, past that, answers 429 with our Retry-After, never 503."""
    from simplear.serving.limits import deployment_limits

    cfg = ServeConfig(max_concurrent_requests=20, retry_after_s=7)
    limits = deployment_limits(cfg)
    assert limits["max_ongoing_requests"] > cfg.max_concurrent_requests and limits["max_queued_requests"] > 0
    assert limits["backpressure_config"].status_code == 429 and limits["backpressure_config"].retry_after_s == 7


def test_generation_needs_a_valid_key(keyed_app, serve_torch_app):
    body = {"prompt": "a red circle", "size": "32x32", "seed": 1}
    for key, message in [(None, "missing API key"), ("wrong", "invalid API key"), (KEY[:-1], "invalid API key")]:
        r = post(keyed_app, body, key=key)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == {"message": message + (": send the header 'Authorization: Bearer <key>'" if key is None else ""),
                                     "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text
    r = post(keyed_app, body, key=None, headers={"Authorization": f"Basic {KEY}"})
    assert r.status_code == 401
    assert post(keyed_app, body).status_code == 200
    assert post(keyed_app, body, key="sk-other-key").status_code == 200  # any key of the file
    assert post(keyed_app, {"prompt": ""}, key=None).status_code == 401  # the key is checked before the body
    # the page stays open and shows the key field
    assert '"auth": true' in requests.get(keyed_app.url + "/", timeout=30).text


def test_the_openai_client_works_against_it(keyed_app):
    from openai import AuthenticationError, BadRequestError, OpenAI

    client = OpenAI(base_url=keyed_app.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    answer = client.images.generate(model="simplear", prompt="a red circle on a blue background", size="64x64",
                                    response_format="b64_json")
    assert len(answer.data) == 1 and png_size(answer.data[0].b64_json) == (64, 64)
    assert abs(answer.created - time.time()) < 600
    two = client.images.generate(model="simplear", prompt="green", n=2, size="32x32", response_format="b64_json")
    assert [png_size(d.b64_json) for d in two.data] == [(32, 32)] * 2
    with pytest.raises(BadRequestError, match="unsupported size '1024x1024'"):
        client.images.generate(model="simplear", prompt="green", size="1024x1024", response_format="b64_json")
    wrong = OpenAI(base_url=keyed_app.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=120)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        wrong.images.generate(model="simplear", prompt="green", size="32x32", response_format="b64_json")


# -- limits -----------------------------------------------------------------------------------------


def health(app, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(app.url + "/v1/health", headers=headers, timeout=30).json()


def test_overload_gets_429_with_retry_after(keyed_app):
    """12 requests at once at a replica that admits 2: the rest get our 429 at once, none waits or fails."""
    before = health(keyed_app, KEY)["stats"]
    body = {"prompt": "a blue square", "size": "64x64", "n": 4}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(keyed_app, body), range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 429}, statuses
    busy = [a for a in answers if a.status_code == 429]
    for a in busy:  # ours, not Ray Serve's: OpenAI's error body
        assert a.headers["retry-after"] == "3"
        assert a.json()["error"]["code"] == "rate_limit_exceeded" and "retry after 3 s" in a.json()["error"]["message"]
    after = health(keyed_app, KEY)
    assert after["queue_depth"] == 0  # every slot given back
    assert after["stats"]["rejected_busy"] - before["rejected_busy"] == len(busy)


@pytest.fixture(scope="module")
def slow_app(serve_torch_app):
    """A batch waits 2 s to fill, the request timeout is 0.3 s: every generation times out. A body has 1 s."""
    with deployed(serve_torch_app, "slow", request_timeout_s=0.3, batch_wait_timeout_s=2.0, body_timeout_s=1.0) as app:
        yield app


def test_a_request_past_its_timeout_gets_504(slow_app):
    t0 = time.time()
    r = post(slow_app, {"prompt": "a red circle", "size": "32x32"}, key=None)
    assert r.status_code == 504 and time.time() - t0 < 1.9  # answered at the timeout, not after the batch
    assert r.json()["error"]["code"] == "timeout" and "request_timeout_s = 0.3 s" in r.json()["error"]["message"]
    answer = health(slow_app)
    assert answer["queue_depth"] == 0 and answer["stats"]["timed_out"] == 1
    time.sleep(2.2)  # the cancelled request left the batch: no engine call was made for it
    assert health(slow_app)["stats"]["batches"] == 0


def test_a_body_over_the_cap_gets_413(keyed_app):
    r = post(keyed_app, raw=b'{"prompt": "' + b"x" * (1 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# -- request ids and metrics ------------------------------------------------------------------------


def test_request_ids_are_returned_and_logged(keyed_app, ray_head):
    rid = "test-" + secrets.token_hex(8)
    r = post(keyed_app, {"prompt": "a red circle", "size": "32x32"}, headers={"X-Request-Id": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    made = [post(keyed_app, {"prompt": ""}).headers["x-request-id"] for _ in range(2)]
    assert all(made) and made[0] != made[1]  # one is made where the client sends none
    logs = Path(ray_head.temp_dir) / "session_latest" / "logs" / "serve"
    deadline = time.time() + 20
    while time.time() < deadline:
        lines = [line for f in logs.glob("replica_keyed_*.log") for line in f.read_text(errors="replace").splitlines()
                 if re.search(rf" {rid} .*generation: 200, 1 image\(s\) 32x32", line)]
        if lines:
            break
        time.sleep(0.5)
    assert lines, sorted(p.name for p in logs.iterdir())
    assert KEY not in "".join(f.read_text(errors="replace") for f in logs.glob("replica_keyed_*.log"))


def test_our_metrics_and_serves_reach_the_metrics_endpoint(keyed_app, ray_head):
    assert post(keyed_app, {"prompt": "a red circle", "size": "32x32", "n": 3}).status_code == 200
    wanted = {
        "images": r'^ray_simplear_serve_images_generated_total{[^}]*app="keyed"[^}]*} ([0-9.e+]+)$',
        "queue": r'^ray_simplear_serve_queue_depth{[^}]*app="keyed"[^}]*} ([0-9.e+]+)$',
        "latency": r'^ray_simplear_serve_request_latency_s_count{[^}]*app="keyed"[^}]*status="200"[^}]*} ([0-9.e+]+)$',
        "serve": r'^ray_serve_num_http_requests_total{[^}]*application="keyed"[^}]*} ([0-9.e+]+)$',
    }
    deadline = time.time() + 30
    while True:
        text = ray_head.scrape()
        found = {k: re.search(p, text, re.M) for k, p in wanted.items()}
        if all(found.values()) and float(found["images"].group(1)) >= 3 or time.time() > deadline:
            break
        time.sleep(1)
    assert all(found.values()), {k: bool(v) for k, v in found.items()}
    assert float(found["images"].group(1)) >= 3 and float(found["latency"].group(1)) >= 1


# -- fuzz -------------------------------------------------------------------------------------------

ODD_VALUES = [None, True, False, -1, 0, 2**64, 1e308, -1e308, 1.5, "", "x", "1", [], {}, [1], {"a": 1}, "∞"]
ODD_SIZES = ["0x0", "-32x32", "32x32x32", "99999999999x99999999999", "32X32", " 32x32", "64x32", "", "x", "١٢x١٢"]
ODD_PATHS = ["/", "/v1", "/v1/images", API + "/", "/" + API, API + "?n=5", "/v1/health/", "/v1/images/edits",
             "/v1/models", "/%00", "/v1/../v1/health", "/" + "a" * 2000, "/v1/images/generations/x"]
ODD_AUTH = [None, "", "Bearer", "Bearer ", "Basic " + KEY, "Token " + KEY, "bearer " + KEY, "Bearer  " + KEY + "  ",
            "Bearer " + KEY + "x", "Bearer " + "k" * 5000]


def fuzz_case(rng: random.Random) -> tuple[str, str, dict, bytes]:
    """One request: (method, path, headers, body); about a fifth are valid generations."""
    valid = {"prompt": rng.choice(["a red circle", "a green square on a white background", "yellow"]),
             "size": "32x32", "n": rng.randint(1, 2), "seed": rng.randrange(100)}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": rng.choice(["application/json", "text/plain", "x/y"])}
    method, path, body = "POST", API, dict(valid)
    kind = rng.randrange(12)
    if kind == 0:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
    elif kind == 1:  # invalid UTF-8 inside a JSON string
        raw = b'{"prompt": "a red \xff\xfe\xc3 circle", "size": "32x32"}'
    elif kind == 2:
        text = json.dumps(valid)
        raw = text[: rng.randrange(len(text))].encode()
    elif kind == 3:
        body = rng.choice([[valid], "a red circle", 42, None, True, [], {}])
        raw = json.dumps(body).encode()
    elif kind == 4:
        body[rng.choice(["prompt", "n", "size", "seed", "guidance_scale", "temperature", "top_k", "top_p",
                         "negative_prompt", "response_format", "model", "user", "style"])] = rng.choice(ODD_VALUES)
        raw = json.dumps(body).encode()
    elif kind == 5:
        body[rng.choice(["size", "n"])] = rng.choice(ODD_SIZES + [0, -1, 5, 10**9, 2.0, "1"])
        raw = json.dumps(body).encode()
    elif kind == 6:
        body["prompt"] = rng.choice(["x" * 10_000, "\ud800 lone surrogate", "nul\x00byte", "🦊" * 50, "\u202eltr"])
        raw = json.dumps(body).encode()
    elif kind == 7:
        raw = rng.choice([b"[" * 100_000, b'{"prompt": NaN}', b'{"prompt": "a", "guidance_scale": Infinity}',
                          b'{"prompt": "a", "seed": 1e999}', b'{"prompt": "a"}' * 3, b"\xef\xbb\xbf{}", b""])
    elif kind == 8:
        headers["Authorization"] = rng.choice(ODD_AUTH + ["Bearer " + "".join(chr(rng.randrange(128, 256)) for _ in range(20))])
        if headers["Authorization"] is None:
            del headers["Authorization"]
        raw = json.dumps(body).encode()
    elif kind == 9:
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"])
        path = rng.choice(ODD_PATHS + [API, "/"])
        raw = json.dumps(body).encode()
    elif kind == 10:
        path = rng.choice(ODD_PATHS)
        raw = json.dumps(body).encode()
    else:
        raw = json.dumps(valid).encode()
    return method, path, headers, raw


def test_fuzz_finds_no_server_error(keyed_app):
    """1,000 seeded random and malformed requests, 4 at a time: every answer is below 500 (504 is documented),
    our errors are OpenAI's error JSON, and the server answers a valid request afterwards."""
    rng = random.Random(1234)
    cases = [fuzz_case(rng) for _ in range(1000)]

    def send(case):
        method, path, headers, raw = case
        r = requests.request(method, keyed_app.url + path, data=raw, headers=headers, timeout=60)
        return r.status_code, r.headers.get("content-type", ""), r.content

    t0 = time.time()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, cases))
    seen = {}
    for case, (status, ctype, content) in zip(cases, answers):
        assert status < 500 or status == 504, (case[:3], case[3][:200], status, content[:300])
        seen[status] = seen.get(status, 0) + 1
        if status >= 400 and ctype.startswith("application/json") and case[0] != "HEAD":
            assert isinstance(json.loads(content)["error"]["message"], str)
    assert {200, 400, 401, 404, 405, 415} <= set(seen), seen  # the cases reach every branch
    assert time.time() - t0 < 60, seen
    print(f"fuzz: {len(cases)} requests in {time.time() - t0:.1f} s, statuses {dict(sorted(seen.items()))}")
    assert post(keyed_app, {"prompt": "a red circle", "size": "32x32"}).status_code == 200
