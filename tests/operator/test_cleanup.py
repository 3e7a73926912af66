"""Uninstall cleanup (the chart's pre-delete hook) against kmock with the real operator.

kmock implements deletion with finalizers as a cluster does: a DELETE of an object with finalizers
only sets deletionTimestamp, and the object goes when its last finalizer is removed. So "the job is
gone" here means the operator (or the hook) really released it.
"""

from __future__ import annotations

import asyncio

from tests.operator.harness import CHILDREN, FINALIZER, Cluster, eventually, job_manifest, phase


async def test_cleanup_deletes_every_job_and_the_running_operator_releases_them(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await cluster.apply(job_manifest("second"))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created" and phase(cluster, "second") == "Created")
    assert FINALIZER in cluster.job()["metadata"]["finalizers"]  # type: ignore[index]  # what made uninstall hang

    assert await asyncio.to_thread(cluster.cleanup, "", 10.0) == 0
    assert cluster.job() is None and cluster.job("second") is None
    releases = [r for r in cluster.k8s if r.method == "PATCH" and r.headers.get("User-Agent", "").startswith("p2ptrain-cleanup")]
    assert releases == []  # the operator released its own finalizers; the hook did not have to
    # Children go by owner reference (garbage collection, which kmock does not run): they point at the job.
    assert all(cluster.child(r, n)["metadata"]["ownerReferences"][0]["uid"] == "uid-digits" for r, n in CHILDREN)  # type: ignore[index]


async def test_cleanup_removes_the_finalizer_itself_when_the_operator_is_gone(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: FINALIZER in (cluster.job() or {}).get("metadata", {}).get("finalizers", []))
    await asyncio.to_thread(cluster.stop_operator)
    # A finalizer of someone else stays theirs: the hook removes only the operator's.
    await cluster.patch_job({"metadata": {"finalizers": [FINALIZER, "example.com/keep"]}})

    assert await asyncio.to_thread(cluster.cleanup, "", 0.5) == 1  # a job is left: Helm reports the hook failed
    job = cluster.job()
    assert job is not None and job["metadata"]["deletionTimestamp"] and job["metadata"]["finalizers"] == ["example.com/keep"]

    await cluster.patch_job({"metadata": {"finalizers": None}})  # its owner releases it
    assert cluster.job() is None


async def test_cleanup_with_the_operator_gone_leaves_no_job_and_no_finalizer(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: FINALIZER in (cluster.job() or {}).get("metadata", {}).get("finalizers", []))
    await asyncio.to_thread(cluster.stop_operator)
    assert await asyncio.to_thread(cluster.cleanup, "", 0.5) == 0
    assert cluster.job() is None
    last = cluster.versions("p2ptrain.dev/v1alpha1/p2ptrainingjobs", "digits")[-1]
    assert last["metadata"]["deletionTimestamp"] and not last["metadata"].get("finalizers")


async def test_cleanup_of_one_namespace_leaves_other_namespaces_alone(cluster: Cluster) -> None:
    other = job_manifest("elsewhere")
    other["metadata"]["namespace"] = "other"
    assert await cluster.request("POST", "/apis/p2ptrain.dev/v1alpha1/namespaces/other/p2ptrainingjobs", other) < 300
    await cluster.apply(job_manifest())
    assert await asyncio.to_thread(cluster.cleanup, "default", 0.5) == 0
    assert cluster.job() is None
    assert not cluster.k8s.objects["p2ptrain.dev/v1alpha1/p2ptrainingjobs", "other", "elsewhere"].deleted
