"""The operator's side of ``topology: ps``: the aggregator's ``/status`` read like a peer's, its
state counted in the job's lifecycle (a failed aggregator fails the job, the job succeeds when it and
every peer did), its pod restarts counted against ``runPolicy.backoffLimit``, and its StatefulSets
scaled with the peers'. For ``p2p`` jobs every function here is a no-op."""

from __future__ import annotations

from typing import Any

import httpx

from p2ptrain.config import ChildNames
from p2ptrain.spec import JobSpec
from p2ptrain.status import PeerState, StatusDict, parse_status
from p2ptrain_operator.settings import Settings

# Pod components whose container restarts count against runPolicy.backoffLimit.
RESTARTING_COMPONENTS = {"p2p": ("peer",), "ps": ("peer", "aggregator")}


async def poll_aggregator(http: httpx.AsyncClient, settings: Settings, job: JobSpec) -> StatusDict | None:
    """The aggregator's ``/status`` (None for p2p jobs, or when it does not answer a valid status)."""
    if job.topology != "ps":
        return None
    url = settings.aggregator_status_url.format(job=job.name, namespace=job.namespace, domain=settings.cluster_domain)
    try:
        response = await http.get(url)
        return parse_status(response.json()) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # StatusError is a ValueError
        return None


def aggregator_status(report: StatusDict | None) -> dict[str, Any]:
    """The job's ``status.aggregator``: what the aggregator reports, in the peers' field names."""
    if report is None:
        return {"state": "unknown"}
    fields = {"state": report["state"], "round": report["round"], "rounds": report.get("rounds", 0),
              "accuracy": report.get("accuracy"), "message": report.get("message", "")}
    return {k: v for k, v in fields.items() if v is not None}


def failure_message(report: StatusDict | None) -> str:
    if report is None or report["state"] != PeerState.FAILED:
        return ""
    return f"the aggregator: {report.get('message', '')}"


def stateful_sets(job: JobSpec, replicas: int) -> list[tuple[str, int]]:
    """The aggregator's StatefulSets and the replicas they get when the peers get ``replicas``."""
    if job.topology != "ps":
        return []
    names = ChildNames(job.name)
    return [(names.aggregator, min(replicas, 1)), (names.aggregator_redis, min(replicas, 1))]
