"""What the handlers report beyond phases: retried errors as a metric, needed Knative flags in status."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from p2ptrain_operator.handlers import measured_handler
from tests.operator.harness import Cluster, eventually, job_manifest, phase


def _errors(handler: str) -> float:
    return REGISTRY.get_sample_value("p2ptrain_operator_reconcile_errors_total", {"handler": handler}) or 0.0


async def test_errors_kopf_will_retry_are_counted_and_a_permanent_spec_error_is_not() -> None:
    before = _errors("probe")
    with pytest.raises(ConnectionError):
        async with measured_handler("probe"):
            raise ConnectionError("API server unreachable")
    assert _errors("probe") == before + 1
    with pytest.raises(kopf.PermanentError):
        async with measured_handler("probe"):
            raise kopf.PermanentError("peers=3 is too few for krum")
    assert _errors("probe") == before + 1  # the job's failure, shown in its status, not the operator's
    timed = REGISTRY.get_sample_value("p2ptrain_operator_reconcile_seconds_count", {"handler": "probe"})
    assert timed == 2


async def test_a_job_on_a_volume_names_the_knative_flag_it_needs(cluster: Cluster) -> None:
    dataset = {"name": "path", "path": "/data/digits.npz", "claimName": "training-data"}
    await cluster.apply(job_manifest(dataset=dataset))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["knativeFlagsNeeded"] == ["kubernetes.podspec-persistent-volume-claim"]
    def warnings() -> list[dict[str, Any]]:  # kopf posts events in the background: wait for it
        events = [r.data for r in cluster.k8s if r.method == "POST" and r.url.path.endswith("/events")]
        return [e for e in events if e and e.get("reason") == "KnativeFlagsNeeded"]

    posted = await eventually(warnings)
    assert "kubernetes.podspec-persistent-volume-claim" in posted[0]["message"]


async def test_a_job_without_volumes_needs_no_knative_flag(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    assert "knativeFlagsNeeded" not in cluster.job()["status"]  # type: ignore[index]
