"""What the benchmarks measure besides wall time: CPU-seconds of a run (this process and every descendant: an
embedded Ray's raylet, services and workers, a pool's processes), by what each process was doing, and the load
average, with a wait for what a previous run left to settle."""

from __future__ import annotations

import os
import threading
import time

RAY_SERVICES = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor", "runtime_env", "ray_client_server")


def who(p, me: int) -> str:
    """What a process is doing, for per-operator CPU: Ray's workers name their task or actor in their title
    (`ray::<name>`), Ray's own services by their program, the pool's workers and this driver apart."""
    if p.pid == me:
        return "driver"
    try:
        title = " ".join(p.cmdline()) or p.name()
    except Exception:  # noqa: BLE001 - gone between listing and reading
        return "other"
    if title.startswith("ray::"):
        name = title[5:].split(" ")[0]
        return "ray worker idle" if name.startswith("IDLE") else name
    if any(svc in title for svc in RAY_SERVICES):
        return "ray services"
    return "pool worker" if "multiprocessing" in title else "other"


class Meter:
    """CPU-seconds of this process and every descendant, in total and by what each process was doing when sampled
    (a process's CPU since the last sample goes to its title now: Ray task workers change title with each task),
    and the 1-minute load average while a run goes."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.psutil, self.every = psutil, every
        self.cpu: dict[int, float] = {}
        self.by_op: dict[str, float] = {}
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, count: bool = True) -> None:
        me = self.psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            now = t.user + t.system
            if count:
                op = who(p, me.pid)
                self.by_op[op] = self.by_op.get(op, 0.0) + now - self.cpu.get(p.pid, 0.0)  # new: all of it
            self.cpu[p.pid] = now

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()
            self.loads.append(os.getloadavg()[0])

    def __enter__(self):
        self._sample(count=False)
        self.base = dict(self.cpu)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = sum(v - self.base.get(pid, 0.0) for pid, v in self.cpu.items())
        self.load_max = max(self.loads) if self.loads else os.getloadavg()[0]
        self.load_mean = sum(self.loads) / len(self.loads) if self.loads else os.getloadavg()[0]


    def figures(self) -> dict:
        """For a benchmark's JSON: CPU-seconds in all and by process (those over 0.05 s), largest first."""
        return {"cpu_s": round(self.cpu_s, 2), "seconds": round(self.seconds, 2),
                "cpu_by_process": {k: round(v, 2) for k, v in sorted(self.by_op.items(), key=lambda x: -x[1]) if v >= 0.05}}


def settle(below: float, limit_s: float) -> float:
    """Wait (up to `limit_s`) for the 1-minute load average to fall below `below`, so a run does not start on what
    the previous one left (it decays with a 1-minute time constant); the load it starts at."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(2)
    return os.getloadavg()[0]
