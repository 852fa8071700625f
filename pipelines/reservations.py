"""A data stage's share of the cluster: what a killed driver's Ray Data executions reserved is given back at once.

Ray Data 2.60 asks a cluster-wide autoscaling coordinator (a detached actor) for its share of the CPUs, renewing
the request every ~10 s; the coordinator serves the oldest request first and splits what is left between the
requesters by integer division. It never checks whether a requester is alive: the request of an execution whose
driver was SIGKILLed lives on until it expires (180 s by default), and a run resumed right after the kill gets a
fraction of the cluster for its data stages meanwhile (on 2 CPUs, one task where two should run).

So each stage names its dataset after the job it runs in (`dataset_name`), which the coordinator's requester ids
carry (`data-<name>_<ulid>_<n>`), and before it starts drops the requests of jobs the cluster lists as dead
(`drop_dead_reservations`). The engine also runs stage tasks with a 30 s expiry (`simplear.ray_env.ray_data_expiry`),
the backstop for a request whose name does not tell its job.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

COORDINATOR = {"name": "AutoscalingCoordinator", "namespace": "AutoscalingCoordinator"}
_OWNER = re.compile(r"@job([0-9a-f]+)_")


def dataset_name(stage: str) -> str:
    """The stage's name on the dashboard's Ray Data page, with the job it runs in."""
    import ray

    return f"{stage}@job{ray.get_runtime_context().get_job_id()}"


def _requesters(coordinator) -> list[str]:
    """The coordinator's requester ids (it has no method listing them: its own attribute, read inside the actor)."""
    import ray

    return ray.get(coordinator.__ray_call__.remote(lambda self: list(self._ongoing_reqs)), timeout=30)


def drop_dead_reservations() -> list[str]:
    """Cancel the coordinator's requests of stage datasets whose job is dead; the requester ids cancelled. Anything
    unexpected (no coordinator yet, another Ray Data version's internals) is logged and left to the expiry."""
    import ray
    from ray._private.state import jobs

    try:
        coordinator = ray.get_actor(**COORDINATOR)
    except ValueError:
        return []  # no Ray Data execution has run on this cluster yet
    try:
        dead = {j["JobID"] for j in jobs() if j.get("IsDead")}
        owners = {rid: m.group(1) for rid in _requesters(coordinator) if (m := _OWNER.search(rid))}
        gone = sorted(rid for rid, job in owners.items() if job in dead)
        ray.get([coordinator.cancel_request.remote(rid) for rid in gone], timeout=30)
    except Exception as e:  # noqa: BLE001 - a missed clean-up costs a reduced share until the expiry, not the stage
        log.warning("could not drop dead jobs' Ray Data reservations (they expire on their own): %s: %s",
                    type(e).__name__, e)
        return []
    if gone:
        log.info("gave back the Ray Data reservations of %d execution(s) of dead jobs: %s", len(gone), ", ".join(gone))
    return gone
