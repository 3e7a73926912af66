"""An inline job (``function.mode: inline``) through the real kopf operator against kmock (see
``harness``: no API server can run here): every child but the Knative Service, and the mode in status."""

from __future__ import annotations

import asyncio

from tests.operator.harness import CHILDREN, Cluster, eventually, job_manifest, phase

KNATIVE = ("serving.knative.dev/v1/services", "digits-gradient")


async def test_an_inline_job_gets_no_knative_service_and_says_its_mode(cluster: Cluster) -> None:
    resources = {"requests": {"cpu": "250m", "memory": "256Mi"}}
    await cluster.apply(job_manifest(functionsPerPeer=4, function={"mode": "inline", "containerConcurrency": 2,
                                                                   "resources": resources}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    others = [c for c in CHILDREN if c != KNATIVE]
    await eventually(lambda: all(cluster.child(r, n) for r, n in others))
    # Timer ticks after creation: a Knative Service created late (or by a replayed handler) shows by now.
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 2)
    assert cluster.child(*KNATIVE) is None and cluster.creates(*KNATIVE) == 0
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["mode"] == "inline" and "knativeFlagsNeeded" not in status
    peer = cluster.child("apps/v1/statefulsets", "digits-peer")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    assert peer["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}}  # two instances' worth


async def test_a_serverless_job_says_its_mode_too(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: (cluster.job() or {}).get("status", {}).get("mode"))
    assert cluster.job()["status"]["mode"] == "serverless"  # type: ignore[index]
    assert cluster.child(*KNATIVE) is not None
