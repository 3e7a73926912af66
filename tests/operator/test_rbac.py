"""RBAC in both directions, from every request the real operator and the uninstall hook make.

A whole job lifecycle runs against kmock (create, progress, suspend and resume, success, model export,
TTL deletion, then uninstall cleanup with and without a running operator) and every request is
recorded. Every call must be granted by ``rbac.py`` and every grant must have been called, except
the documented ``UNOBSERVABLE`` ones. With one watched namespace, every call must stay in it, so the
chart's namespaced Role is enough.
"""

from __future__ import annotations

import asyncio

import pytest

from p2ptrain_operator.rbac import CLEANUP_RULES, OPERATOR_RULES, UNOBSERVABLE, grants
from tests.operator.harness import (
    CLEANUP_AGENTS,
    FINALIZER,
    OPERATOR_AGENTS,
    Call,
    Cluster,
    eventually,
    job_manifest,
    phase,
)


def _replicas(cluster: Cluster, name: str) -> int | None:
    child = cluster.child("apps/v1/statefulsets", name)
    return None if child is None else child["spec"]["replicas"]


def _state(cluster: Cluster) -> str:
    job = cluster.job() or {}
    scales = [(r.headers.get("User-Agent", "")[:20], r.data) for r in cluster.k8s
              if r.method == "PATCH" and str(r.url.path).endswith("statefulsets/digits-peer")]
    return (f"phase={phase(cluster)} replicas={_replicas(cluster, 'digits-peer')} spec={job.get('spec')} "
            f"status.message={job.get('status', {}).get('message')} scale patches={scales}")


async def _lifecycle(cluster: Cluster, namespace: str) -> None:
    await cluster.apply(job_manifest(output={"claimName": "models", "path": "digits/model.safetensors"},
                                     runPolicy={"ttlSecondsAfterFinished": 0}))
    await asyncio.to_thread(cluster.start_operator, namespace)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("training")
    await eventually(lambda: phase(cluster) == "Running")
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: phase(cluster) == "Suspended" and _replicas(cluster, "digits-peer") == 0)
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: phase(cluster) in ("Created", "Running") and _replicas(cluster, "digits-peer") == 2,
                     describe=lambda: _state(cluster))
    cluster.peers.report("succeeded")
    await eventually(lambda: phase(cluster) == "Succeeded")
    await eventually(lambda: cluster.child("batch/v1/jobs", "digits-export"))
    path = "/apis/batch/v1/namespaces/default/jobs/digits-export"
    assert await cluster.request("PATCH", path, {"status": {"succeeded": 1}}, "application/merge-patch+json") < 300
    await eventually(lambda: cluster.job() is None)  # the TTL (0 s) deleted it after the export

    # Uninstall while the operator runs (the pre-delete hook): it deletes, the operator releases.
    await cluster.apply(job_manifest("second"))
    await eventually(lambda: phase(cluster, "second") == "Created")
    assert await asyncio.to_thread(cluster.cleanup, namespace) == 0
    assert cluster.job("second") is None
    # And with the operator already gone: the hook removes the finalizer itself.
    await cluster.apply(job_manifest("third"))
    await eventually(lambda: FINALIZER in (cluster.job("third") or {}).get("metadata", {}).get("finalizers", []))
    await asyncio.to_thread(cluster.stop_operator)
    assert await asyncio.to_thread(cluster.cleanup, namespace, 0.5) == 0
    assert cluster.job("third") is None


def _as_grants(calls: list[Call]) -> set[tuple[str, str, str]]:
    return {(c.group, c.resource, c.verb) for c in calls}


@pytest.mark.parametrize("namespace", ["", "default"], ids=["cluster-wide", "one-namespace"])
async def test_rbac_grants_exactly_what_a_whole_lifecycle_calls(cluster: Cluster, namespace: str) -> None:
    await _lifecycle(cluster, namespace)

    operator = cluster.calls(OPERATOR_AGENTS)
    called, granted = _as_grants(operator), grants(OPERATOR_RULES)
    assert called - granted == set(), f"called but not granted: {sorted(called - granted)}"
    assert granted - called - set(UNOBSERVABLE) == set(), f"granted but never called: {sorted(granted - called - set(UNOBSERVABLE))}"
    assert not called & set(UNOBSERVABLE)  # an exception that became observable must leave the list

    hook = cluster.calls(CLEANUP_AGENTS)
    called, granted = _as_grants(hook), grants(CLEANUP_RULES)
    assert called == granted, f"hook: called {sorted(called)}, granted {sorted(granted)}"

    if namespace:  # a Role in the watched namespace is enough: nothing cluster-wide or elsewhere
        outside = {c for c in operator + hook if c.namespace != namespace}
        assert outside == set(), f"calls outside namespace {namespace}: {sorted(outside, key=str)}"
    else:  # cluster-wide the jobs are listed and watched across namespaces (a ClusterRole)
        assert Call("p2ptrain.dev", "p2ptrainingjobs", "watch", None) in operator
