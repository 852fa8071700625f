"""Checks of the run dir's storage before any stage runs: what the file system under it is, and whether every node
of the cluster sees it.

A run dir on a node's own disk works on one machine and fails on a cluster at the first write of a task on
another node (inside the fencing check, far from the cause); so before any stage runs on a cluster of several
nodes, one task pinned to each alive node reads the run's lock and must find this run's id in it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("simplear.engine")


class UnsupportedRunDir(RuntimeError):
    """The run dir's storage lacks what a run needs: hard links, atomic renames, or a path every node sees."""


def mount_of(path: str | os.PathLike) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path`, from /proc/self/mountinfo; ("?", "?") where
    that cannot be read (not Linux)."""
    target = str(Path(path).resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "?", "?"
    mounts = []
    for line in lines:
        fields = line.split(" ")
        if "-" in fields:  # mount point is field 5; the file system type follows the "-" separator
            mounts.append((fields[4].replace("\\040", " "), fields[fields.index("-") + 1]))
    holding = [m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m[0]), default=("?", "?"))


def node_sees_run(lock_path: str, run_id: str) -> dict:
    """Body of the task pinned to one node: whether this node reads the run's lock, holding this run's id."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
             "ip": ray.util.get_node_ip_address()}
    try:
        holder = json.loads(Path(lock_path).read_text())
    except FileNotFoundError:
        missing = lock_path if Path(lock_path).parent.exists() else str(Path(lock_path).parent)
        return {**where, "problem": f"{missing} does not exist on this node"}
    except (OSError, ValueError) as e:
        return {**where, "problem": f"cannot read {lock_path}: {e}"}
    if holder.get("run_id") != run_id:
        return {**where, "problem": f"{lock_path} there is another run's (a different folder of the same name?)"}
    return {**where, "problem": None}


def check_every_node_sees_the_run(lock_path: Path, run_id: str, timeout_s: float = 120) -> None:
    """UnsupportedRunDir naming each alive node that does not see the run dir; nothing to check on one node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    task = ray.remote(node_sees_run)
    refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                         name="run-dir-visible").remote(str(lock_path), run_id) for n in nodes]
    answers = ray.get(refs, timeout=timeout_s)
    blind = [a for a in answers if a["problem"]]
    if blind:
        point, fstype = mount_of(lock_path.parent)
        names = "; ".join(f"node {a['ip']} ({a['host']}, {a['node_id'][:12]}): {a['problem']}" for a in blind)
        raise UnsupportedRunDir(f"the run dir {lock_path.parent} is not visible on {len(blind)} of {len(nodes)} nodes "
                           f"({names}). Here it lies on {point} ({fstype}): a run on a cluster needs a run dir every "
                           "node mounts at the same path (NFS, a shared file system), given as an absolute path")
    log.info("run dir %s: visible on all %d nodes", lock_path.parent, len(nodes))
