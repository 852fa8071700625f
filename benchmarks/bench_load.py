"""Load on the serving stack: concurrent clients for a fixed time against `simplear.serving` (torch engine) through
Ray Serve's HTTP proxy, with an API key, as a deployment answers them: errors (any status but 200: 0 expected
below `max_concurrent_requests`), p50/p99 latency, images/s, and how full the batches ran.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_load.py [--clients 32] [--seconds 60] [--json out.json]

The model is the tests' tiny one (tests/serve_support.py: a random 2-layer Qwen2, 64 visual tokens per 64 px
image) unless --model names a checkpoint, so the figures measure the serving path (proxy, auth, queue,
batching, PNG encoding) more than the model. Ray is started here, on this machine, and stopped at the end;
the clients run in this process, so on a small machine they share its cores with the server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle on a black background",
           "a purple diamond on an orange background", "a white cross on a pink background", "a cyan circle on a red background"]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value some request really took."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, key: str, clients: int, seconds: float, size: str, n: int) -> tuple[list[tuple[int, float, int]], float]:
    """Each client sends its next request as soon as the last is answered, until the deadline; every answer is
    kept as (status, seconds, images). Returns them and the wall time until the last one came back."""
    import requests

    answers: list[tuple[int, float, int]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        with requests.Session() as s:
            s.headers["Authorization"] = f"Bearer {key}"
            k = 0
            while time.perf_counter() < deadline:
                body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "size": size, "n": n, "seed": i * 100_000 + k}
                t0 = time.perf_counter()
                try:
                    r = s.post(url, json=body, timeout=300)
                    status, images = r.status_code, len(r.json().get("data", [])) if r.status_code == 200 else 0
                except Exception:  # noqa: BLE001 - a dropped connection counts as an error, like any non-200
                    status, images = 0, 0
                with lock:
                    answers.append((status, time.perf_counter() - t0, images))
                k += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the tests' tiny model, built here)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("-n", type=int, default=1, help="images per request")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    ap.add_argument("--replica-cpus", type=float, default=1)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray started here (default: all)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    import ray
    import requests
    from ray import serve

    from simplear.serving import ServeConfig, start

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    if args.model:
        ckpt = Path(args.model)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from serve_support import make_checkpoint  # the model the serving tests use

        ckpt = make_checkpoint(work / "ckpt")
    key = secrets.token_urlsafe(24)
    keys_file = work / "api_keys"
    keys_file.write_text(key + "\n")
    cfg = ServeConfig(engine="torch", port=free_port(), app_name="bench", sizes=[args.size], max_n=max(args.n, 1),
                      max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                      api_keys_file=str(keys_file), smoke_prompt=None)
    ray.init(address="local", num_cpus=args.num_cpus, namespace="bench-load", include_dashboard=False, log_to_driver=False)
    try:
        start(ckpt, cfg, cpus=args.replica_cpus)
        api = f"{cfg.url}/v1/images/generations"
        drive(api, key, clients=4, seconds=3, size=args.size, n=args.n)  # warm-up: first batches, allocator, PNG
        before = requests.get(f"{cfg.url}/v1/health", timeout=30).json()["stats"]
        load = os.getloadavg()[0]
        answers, wall = drive(api, key, args.clients, args.seconds, args.size, args.n)
        stats = requests.get(f"{cfg.url}/v1/health", timeout=30).json()["stats"]
    finally:
        serve.shutdown()
        ray.shutdown()

    ok = sorted(t for status, t, _ in answers if status == 200)
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    batches = stats["batches"] - before["batches"]
    results = {
        "checkpoint": str(ckpt) if args.model else "tests/serve_support.py make_checkpoint (random, 2 layers)",
        "engine": "torch", "size": args.size, "images_per_request": args.n, "clients": args.clients, "seconds": args.seconds,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "replica_cpus": args.replica_cpus, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "load_avg_1min_before": load, "requests": len(answers), "errors": len(answers) - len(ok), "statuses": statuses,
        "wall_s": wall, "requests_per_s": len(ok) / wall, "images_per_s": sum(i for _, _, i in answers) / wall,
        "latency_p50_s": percentile(ok, 50) if ok else None, "latency_p99_s": percentile(ok, 99) if ok else None,
        "latency_max_s": ok[-1] if ok else None,
        "batches": batches, "mean_requests_per_batch": (stats["requests"] - before["requests"]) / max(batches, 1),
        "max_batch_requests": stats["max_batch_requests"],
    }
    print(f"\n{args.clients} clients for {args.seconds:.0f} s, {args.size} x {args.n}, torch engine, "
          f"{args.replica_cpus:g} CPU replica on {os.cpu_count()} cores (load {load:.1f} before)")
    print("| requests | errors | p50 latency | p99 latency | images/s | requests per batch |")
    print("|---:|---:|---:|---:|---:|---:|")
    p50 = f"{results['latency_p50_s']:.2f} s" if ok else "-"
    p99 = f"{results['latency_p99_s']:.2f} s" if ok else "-"
    print(f"| {results['requests']} | {results['errors']} | {p50} | {p99} | {results['images_per_s']:.1f} | "
          f"{results['mean_requests_per_batch']:.1f} |")
    if results["errors"]:
        print(f"statuses: {statuses}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
