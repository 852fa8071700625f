"""Before any stage runs on a cluster: does every node see the run dir?

A run dir on a node's own disk works on one machine and fails on a cluster at the first write of a task on
another node (inside the fencing check, far from the cause); so before any stage runs on a cluster of several
nodes, one task pinned to each alive node reads the run's lock and must find this run's id in it (on object
storage this proves each node reaches the bucket with credentials that read it).
"""

from __future__ import annotations

import logging
import socket

from simplear.storage import Store
from simplear.workflow.lock import fence_problem
from simplear.storage.mounts import UnsupportedRunDir

log = logging.getLogger("simplear.engine")


def node_sees_run(run: str, run_id: str) -> dict:
    """Body of the task pinned to one node: whether this node reads the run's lock, holding this run's id."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
             "ip": ray.util.get_node_ip_address()}
    try:
        problem = fence_problem(run, run_id)
    except Exception as e:  # noqa: BLE001 - whatever this node's storage answers is the finding
        problem = f"cannot read the run's lock: {type(e).__name__}: {e}"
    return {**where, "problem": problem}


def check_every_node_sees_the_run(store: Store, run_id: str, timeout_s: float = 120) -> None:
    """UnsupportedRunDir naming each alive node that does not see the run dir; nothing to check on one node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    task = ray.remote(node_sees_run)
    refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                         name="run-dir-visible").remote(store.uri, run_id) for n in nodes]
    answers = ray.get(refs, timeout=timeout_s)
    blind = [a for a in answers if a["problem"]]
    if blind:
        names = "; ".join(f"node {a['ip']} ({a['host']}, {a['node_id'][:12]}): {a['problem']}" for a in blind)
        raise UnsupportedRunDir(f"the run dir {store.uri} is not visible on {len(blind)} of {len(nodes)} "
                                f"nodes ({names}). Here it is {store.describe()}: a run on a cluster needs a run "
                                "dir every node sees: a path every node mounts (NFS, a shared file system), given as "
                                "an absolute path, or object storage (s3://) every node can reach")
    log.info("run dir %s: visible on all %d nodes", store.uri, len(nodes))
