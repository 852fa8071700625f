"""The hardened API: API keys (the rule, the Bearer check, OpenAI's own client), the bounded queue (429 with
Retry-After before Ray Serve says anything), the request timeout (504), request ids in the replica's log,
our metrics next to Ray Serve's, and a seeded fuzz test that finds no 5xx but the documented 504."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from serve_support import deployed, write_keys
from simplear.serving import API_KEYS_ENV, ServeConfig, load_api_keys

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
    # the health route and the page stay open; the page shows the key field
    health = requests.get(keyed_app.url + "/v1/health", timeout=30).json()
    assert health["auth"] is True and health["limits"]["max_concurrent_requests"] == 2
    assert '"auth": true' in requests.get(keyed_app.url + "/", timeout=30).text
    # on loopback without a key the API is open
    assert requests.get(serve_torch_app.url + "/v1/health", timeout=30).json()["auth"] is False


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


def test_overload_gets_429_with_retry_after(keyed_app):
    """12 requests at once at a replica that admits 2: the rest get our 429 at once, none waits or fails."""
    before = requests.get(keyed_app.url + "/v1/health", timeout=30).json()["stats"]
    body = {"prompt": "a blue square", "size": "64x64", "n": 4}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(keyed_app, body), range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 429}, statuses
    busy = [a for a in answers if a.status_code == 429]
    for a in busy:  # ours, not Ray Serve's: OpenAI's error body
        assert a.headers["retry-after"] == "3"
        assert a.json()["error"]["code"] == "rate_limit_exceeded" and "retry after 3 s" in a.json()["error"]["message"]
    health = requests.get(keyed_app.url + "/v1/health", timeout=30).json()
    assert health["queue_depth"] == 0  # every slot given back
    assert health["stats"]["rejected_busy"] - before["rejected_busy"] == len(busy)


@pytest.fixture(scope="module")
def slow_app(serve_torch_app):
    """A batch waits 2 s to fill, the request timeout is 0.3 s: every generation times out."""
    with deployed(serve_torch_app, "slow", request_timeout_s=0.3, batch_wait_timeout_s=2.0) as app:
        yield app


def test_a_request_past_its_timeout_gets_504(slow_app):
    t0 = time.time()
    r = post(slow_app, {"prompt": "a red circle", "size": "32x32"}, key=None)
    assert r.status_code == 504 and time.time() - t0 < 1.9  # answered at the timeout, not after the batch
    assert r.json()["error"]["code"] == "timeout" and "request_timeout_s = 0.3 s" in r.json()["error"]["message"]
    health = requests.get(slow_app.url + "/v1/health", timeout=30).json()
    assert health["queue_depth"] == 0 and health["stats"]["timed_out"] == 1
    time.sleep(2.2)  # the cancelled request left the batch: no engine call was made for it
    assert requests.get(slow_app.url + "/v1/health", timeout=30).json()["stats"]["batches"] == 0


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
    assert {200, 400, 401, 404, 405} <= set(seen), seen  # the cases reach every branch
    assert time.time() - t0 < 60, seen
    print(f"fuzz: {len(cases)} requests in {time.time() - t0:.1f} s, statuses {dict(sorted(seen.items()))}")
    assert post(keyed_app, {"prompt": "a red circle", "size": "32x32"}).status_code == 200
