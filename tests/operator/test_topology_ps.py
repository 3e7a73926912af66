"""``topology: ps`` in the real kopf operator against kmock (see ``harness``: no API server can run
here, kmock emulates one; the peers and the aggregator are a fake answering ``/status``): the
aggregator's children, its part in the job's status and lifecycle, and the RBAC a ps lifecycle uses."""

from __future__ import annotations

import asyncio

import kmock

from p2ptrain_operator.rbac import OPERATOR_RULES, grants
from tests.operator.harness import (
    AGGREGATOR,
    CHILDREN,
    OPERATOR_AGENTS,
    Cluster,
    eventually,
    job_manifest,
    phase,
)

PS_CHILDREN = [
    ("v1/services", "digits-aggregator-redis"),
    ("apps/v1/statefulsets", "digits-aggregator-redis"),
    ("v1/services", "digits-aggregator"),
    ("apps/v1/statefulsets", "digits-aggregator"),
]


def _replicas(cluster: Cluster, name: str) -> int | None:
    child = cluster.child("apps/v1/statefulsets", name)
    return None if child is None else child["spec"]["replicas"]


def _aggregator_reports(cluster: Cluster, state: str, **fields: object) -> None:
    cluster.peers.reports[("digits", AGGREGATOR)] = {"peer": 2, "state": state, "round": 5, "rounds": 10, **fields}


async def test_a_ps_job_gets_the_aggregator_and_its_redis_once_each(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(topology="ps"))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await eventually(lambda: all(cluster.child(r, n) for r, n in CHILDREN + PS_CHILDREN))
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 3)  # peers and aggregator, several ticks
    for resource, name in CHILDREN + PS_CHILDREN:
        assert len(cluster.k8s.objects[kmock.resource(resource), "default", name].history) == 1, f"{resource}/{name} changed"
        owners = cluster.child(resource, name)["metadata"]["ownerReferences"]  # type: ignore[index]
        assert owners[0]["uid"] == "uid-digits"  # deletion cascades
    aggregator = cluster.child("apps/v1/statefulsets", "digits-aggregator")
    assert aggregator is not None and aggregator["spec"]["replicas"] == 1
    assert aggregator["spec"]["template"]["spec"]["containers"][0]["args"][0] == "aggregator"
    assert cluster.job()["status"]["aggregator"] == {"state": "unknown"}  # type: ignore[index]


async def test_a_p2p_job_has_no_aggregator(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: all(cluster.child(r, n) for r, n in CHILDREN))
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 2 * 2)
    assert all(cluster.child(r, n) is None for r, n in PS_CHILDREN)
    assert "aggregator" not in cluster.job()["status"]  # type: ignore[index]


async def test_a_ps_job_succeeds_only_when_the_aggregator_did(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(topology="ps"))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("training", round=7)
    _aggregator_reports(cluster, "training", round=7, accuracy=0.8)
    await eventually(lambda: phase(cluster) == "Running")
    status = await eventually(lambda: (cluster.job() or {}).get("status", {}).get("aggregator", {}).get("round") == 7
                              and cluster.job()["status"])  # type: ignore[index]
    assert status["aggregator"] == {"state": "training", "round": 7, "rounds": 10, "accuracy": 0.8, "message": ""}
    assert status["peersReadyText"] == "2/2"  # the peers' count, as for p2p
    cluster.peers.report("succeeded", round=10)
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 3)
    assert phase(cluster) == "Running"  # the peers are done, the aggregator is not
    _aggregator_reports(cluster, "succeeded", round=10, accuracy=0.96)
    await eventually(lambda: phase(cluster) == "Succeeded")
    for name in ("digits-peer", "digits-aggregator", "digits-aggregator-redis"):  # cleanPodPolicy Running
        await eventually(lambda name=name: _replicas(cluster, name) == 0)  # type: ignore[misc]


async def test_a_failed_aggregator_fails_the_job_with_its_message(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(topology="ps"))
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("training")
    _aggregator_reports(cluster, "failed", message="training diverged in round 3")
    await eventually(lambda: phase(cluster) == "Failed")
    assert "the aggregator: training diverged in round 3" in cluster.job()["status"]["message"]  # type: ignore[index]


async def test_suspending_a_ps_job_scales_the_aggregator_too_within_its_rbac(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(topology="ps", peers=3))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: phase(cluster) == "Suspended")
    for name in ("digits-peer", "digits-aggregator", "digits-aggregator-redis"):
        await eventually(lambda name=name: _replicas(cluster, name) == 0)  # type: ignore[misc]
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _replicas(cluster, "digits-peer") == 3)
    for name in ("digits-aggregator", "digits-aggregator-redis"):
        await eventually(lambda name=name: _replicas(cluster, name) == 1)  # type: ignore[misc]
    # Every request the operator made for the ps job is one its RBAC grants (test_rbac.py checks the
    # converse over a whole lifecycle).
    called = {(c.group, c.resource, c.verb) for c in cluster.calls(OPERATOR_AGENTS)}
    assert called - grants(OPERATOR_RULES) == set()
