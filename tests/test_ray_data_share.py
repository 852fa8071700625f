"""A run resumed right after its driver was SIGKILLed gets the cluster's CPUs for its data stages at once: the dead
job's Ray Data reservation is given back when the next stage starts (pipelines/reservations.py), not when it
expires (here 30 s, conftest's setting; 180 s by Ray's default)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import ray
from ray._private.state import jobs

from conftest import ROOT, wait_for_ray_data_to_own_the_cluster
from pipelines.reservations import COORDINATOR, _requesters
from pipelines.resumable_parquet import SplitByReason, read_receipts, run_stage
from pipelines_support import slow_identity, stage_context, write_input_stage

VICTIM = textwrap.dedent("""
    import sys, time
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    from pipelines.reservations import dataset_name
    ds = ray.data.range(64, override_num_blocks=64).map_batches(lambda b: (time.sleep(5), b)[1], batch_size=1, num_cpus=1)
    ds.set_name(dataset_name("filter"))
    print(ray.get_runtime_context().get_job_id(), flush=True)
    for _ in ds.iter_batches(batch_size=None):
        pass
""")


def test_a_killed_drivers_reservation_is_given_back_when_the_next_stage_starts(ray_session, tmp_path):
    wait_for_ray_data_to_own_the_cluster()  # what earlier tests' killed drivers left has expired
    coordinator = ray.get_actor(**COORDINATOR)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, ray_session.address], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        job = victim.stdout.readline().strip()
        assert job, "the victim driver did not start"
        deadline = time.time() + 60
        while not [r for r in _requesters(coordinator) if f"@job{job}_" in r]:
            assert time.time() < deadline and victim.poll() is None, "the victim's dataset never asked for CPUs"
            time.sleep(0.5)
        time.sleep(2)  # its two tasks hold both CPUs
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    deadline = time.time() + 30
    while not any(j["JobID"] == job and j.get("IsDead") for j in jobs()):
        assert time.time() < deadline, "the cluster never saw the victim's job die"
        time.sleep(0.2)
    held = [r for r in _requesters(coordinator) if f"@job{job}_" in r]
    assert held, "the dead job's reservation is gone already: nothing to give back"

    schema = pa.schema([("key", pa.string()), ("reason", pa.string())])
    write_input_stage(tmp_path, "src", [{"key": [f"s{i}-{j:03d}" for j in range(10)], "reason": [None] * 10}
                                        for i in range(6)], schema)
    ctx = stage_context(tmp_path, "t", "filter", None, ["src"], cpus=1, concurrency=2)
    t0 = time.time()
    run_stage(ctx, folders=["shards", "rejected"], split=SplitByReason(schema, schema), process=slow_identity,
              process_kwargs={"seconds": 0.4}, batch_size=4)
    elapsed = time.time() - t0
    tasks: dict[tuple, list[dict]] = {}  # by call: an actor's calls share its task id, each has its start
    for recs in read_receipts(ctx.store, ctx.name).values():
        for _, d in recs:
            tasks.setdefault((d["task"], d["started"]), []).append(d)
    spans = [(min(d["started"] for d in ds), max(d["at"] for d in ds)) for ds in tasks.values()]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    # with the dead job's share kept: one task at a time (or none until it expires), 6 x 1.2 s of work
    assert overlap == 2 and elapsed < 20, (elapsed, sorted(spans))
    assert not [r for r in _requesters(coordinator) if f"@job{job}_" in r]
