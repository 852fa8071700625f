"""A real S3 endpoint on loopback for the tests: moto's server app, plus a count of the requests it answered.

`python tests/s3_server.py PORT` serves moto's S3 (the same app as `moto_server`) and, beside it:
- `GET /_requests`: [[operation, path, count], ...] for every request since the last reset, where operation is
  one of GET, HEAD, LIST, PUT, COPY, POST (multipart parts and completions), DELETE, and a listing's path is
  `/bucket/<prefix it listed>`;
- `POST /_requests/reset`: start counting afresh.
Every client is counted (boto3 and pyarrow, the driver and every Ray worker), which is what object storage bills.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from urllib.parse import parse_qs

from moto.moto_server.threaded_moto_server import MotoRequestHandler
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

COUNTS: Counter = Counter()
MUTEX = threading.Lock()


def operation(environ) -> str:
    method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
    if method == "GET" and ("list-type" in query or environ["PATH_INFO"].rstrip("/").count("/") <= 1):
        return "LIST"  # a GET of the bucket itself (path-style addressing)
    if method == "PUT" and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
        return "COPY"
    if method == "PUT" and "partNumber" in query:
        return "POST"  # a multipart part: billed as a PUT-class request, counted with the multipart calls
    return method


def counting(app):
    def wrapped(environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/_requests"):
            if environ["REQUEST_METHOD"] == "POST":
                with MUTEX:
                    COUNTS.clear()
                body = b"{}"
            else:
                with MUTEX:
                    body = json.dumps([[op, p, n] for (op, p), n in sorted(COUNTS.items())]).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        op = operation(environ)
        if op == "LIST":  # a listing's path is the bucket: record what it listed
            prefix = parse_qs(environ.get("QUERY_STRING", "")).get("prefix", [""])[0]
            path = f"{path.rstrip('/')}/{prefix}"
        with MUTEX:
            COUNTS[(op, path)] += 1
        return app(environ, start_response)

    return wrapped


ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}  # keys moto accepts; no instance-metadata look-ups


def launch(log_path: str, timeout_s: float = 60) -> tuple[subprocess.Popen, str, dict]:
    """Start this server in its own process on a free loopback port: (process, URL, the AWS variables that point
    every client at it)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, __file__, str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/_requests", timeout=2).close()
            return proc, url, {"AWS_ENDPOINT_URL": url, **ENV}
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the S3 server did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.2)


def main() -> None:
    port = int(sys.argv[1])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, counting(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
