"""The real kopf operator against kmock (see ``harness``): a job's lifecycle from apply to deletion."""

from __future__ import annotations

import asyncio
import datetime

import kmock
import pytest
from prometheus_client import REGISTRY

from p2ptrain_operator import metrics
from p2ptrain_operator.lifecycle import CONDITION_TYPES
from tests.operator.harness import CHILDREN, Cluster, eventually, job_manifest, phase


def _replicas(cluster: Cluster, name: str) -> int | None:
    child = cluster.child("apps/v1/statefulsets", name)
    return None if child is None else child["spec"]["replicas"]


async def test_applying_a_job_creates_every_child_exactly_once(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await eventually(lambda: all(cluster.child(r, n) for r, n in CHILDREN))
    # Several timer ticks after creation (the create handler may be replayed meanwhile: kmock replays
    # objects on every watch); a handler that changed or re-created children would have done so by now.
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 2)
    for resource, name in CHILDREN:
        assert len(cluster.k8s.objects[kmock.resource(resource), "default", name].history) == 1, f"{resource}/{name} changed"
        owners = cluster.child(resource, name)["metadata"]["ownerReferences"]  # type: ignore[index]
        assert owners[0]["uid"] == "uid-digits" and owners[0]["controller"] is True  # deletion cascades
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["peersReadyText"] == "0/2"
    states = {c["type"]: c["status"] for c in status["conditions"]}
    assert states == {kind: "True" if kind == "Created" else "False" for kind in CONDITION_TYPES}


async def test_operator_restart_resumes_without_duplicates_and_keeps_the_secret(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: cluster.child("serving.knative.dev/v1/services", "digits-gradient"))
    secret = cluster.child("v1/secrets", "digits-secrets")
    await asyncio.to_thread(cluster.stop_operator)
    await asyncio.to_thread(cluster.start_operator)
    # The resume handler ran to its end: it tried every child again (409 each) after the Secret.
    await eventually(lambda: all(cluster.creates(r, n) == 2 for r, n in CHILDREN))
    assert cluster.child("v1/secrets", "digits-secrets") == secret
    for resource, name in CHILDREN:
        assert len(cluster.k8s.objects[kmock.resource(resource), "default", name].history) == 1


async def test_status_follows_the_peers_to_success_and_cleans_up_pods(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("training", round=7, loss=0.5, accuracy=0.8)
    await eventually(lambda: phase(cluster) == "Running")
    status = await eventually(lambda: (cluster.job() or {}).get("status", {}).get("round") == 7 and cluster.job()["status"])  # type: ignore[index]
    assert status["peersReadyText"] == "2/2" and status["loss"] == 0.5 and status["accuracy"] == 0.8
    cluster.peers.report("succeeded", round=10, accuracy=0.96)
    await eventually(lambda: phase(cluster) == "Succeeded")
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["completionTime"] and {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    await eventually(lambda: _replicas(cluster, "digits-peer") == 0)


async def test_a_failed_peer_fails_the_job_with_its_message(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("training")
    cluster.peers.reports[("digits", 1)] = {"peer": 1, "state": "failed", "round": 3, "message": "cannot reach Redis"}
    await eventually(lambda: phase(cluster) == "Failed")
    assert "cannot reach Redis" in cluster.job()["status"]["message"]  # type: ignore[index]


def _jobs_in(phase_name: str) -> float | None:
    return REGISTRY.get_sample_value("p2ptrain_operator_jobs", {"phase": phase_name})


def _kopf_done(cluster: Cluster) -> bool:
    """kopf finished handling the job: it recorded the spec it handled and no handler is in progress."""
    annotations = (cluster.job() or {}).get("metadata", {}).get("annotations") or {}
    kopf_keys = {k for k in annotations if k.startswith("kopf.zalando.org/")}
    return kopf_keys == {"kopf.zalando.org/last-handled-configuration"}


def _reconcile_runs() -> float:
    return REGISTRY.get_sample_value("p2ptrain_operator_reconcile_seconds_count", {"handler": "reconcile"}) or 0.0


async def test_a_finished_job_is_never_recreated(cluster: Cluster) -> None:
    manifest = job_manifest()
    manifest["status"] = {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}
    await cluster.apply(manifest)
    for _ in range(2):  # the first start, then a restart: neither rebuilds the job
        metrics.JOBS.labels(phase="Succeeded").set(0)
        runs = _reconcile_runs()
        await asyncio.to_thread(cluster.start_operator)
        # The operator saw the job (its event handler counted it), its create (first start) or resume
        # (restart) handler ran, and kopf finished the handling cycle (only its last-handled record left).
        await eventually(lambda: _jobs_in("Succeeded") == 1)
        await eventually(lambda runs=runs: _reconcile_runs() > runs)  # type: ignore[misc]
        await eventually(lambda: _kopf_done(cluster), describe=lambda: str(cluster.job()["metadata"].get("annotations")))  # type: ignore[index]
        await asyncio.to_thread(cluster.stop_operator)
    assert all(cluster.child(r, n) is None for r, n in CHILDREN)
    assert all(cluster.creates(r, n) == 0 for r, n in CHILDREN)
    assert phase(cluster) == "Succeeded"


def _timestamp(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def test_ttl_after_finished_deletes_the_job_within_a_second_of_its_deadline(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(runPolicy={"ttlSecondsAfterFinished": 2}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("succeeded")
    await eventually(lambda: phase(cluster) == "Succeeded")
    await eventually(lambda: _jobs_in("Succeeded") == 1)
    await eventually(lambda: cluster.job() is None, timeout=15)
    # The API server stamps deletionTimestamp when the DELETE arrives; the docs promise that is
    # within a second after completionTime + ttlSecondsAfterFinished, and never before.
    versions = cluster.versions("p2ptrain.dev/v1alpha1/p2ptrainingjobs", "digits")
    completed = _timestamp(next(v["status"]["completionTime"] for v in versions if v.get("status", {}).get("completionTime")))
    deleted = _timestamp(next(v["metadata"]["deletionTimestamp"] for v in versions if v["metadata"].get("deletionTimestamp")))
    assert completed + 2 <= deleted <= completed + 2 + 1, f"deleted {deleted - completed:.2f}s after completion, TTL is 2s"
    # The jobs-by-phase gauge forgets a deleted job.
    await eventually(lambda: _jobs_in("Succeeded") == 0)


async def test_suspend_scales_to_zero_and_resume_scales_back(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await eventually(lambda: _replicas(cluster, "digits-peer") == 3)
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: phase(cluster) == "Suspended")
    for name in ("digits-peer", "digits-redis"):
        await eventually(lambda name=name: _replicas(cluster, name) == 0)  # type: ignore[misc]
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: phase(cluster) == "Created")
    await eventually(lambda: _replicas(cluster, "digits-peer") == 3)


async def test_a_job_created_suspended_starts_with_nothing_running(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3, runPolicy={"suspend": True}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Suspended")
    for name in ("digits-peer", "digits-redis"):
        await eventually(lambda name=name: _replicas(cluster, name) == 0)  # type: ignore[misc]
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _replicas(cluster, "digits-peer") == 3 and phase(cluster) == "Created")


async def test_an_invalid_job_fails_with_the_reason(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3, aggregation={"rule": "krum", "byzantine": 1}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Failed")
    assert "too few for krum" in cluster.job()["status"]["message"]  # type: ignore[index]
    assert all(cluster.child(r, n) is None for r, n in CHILDREN)


async def test_changing_peers_of_a_created_job_is_refused_with_a_message(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await cluster.patch_job({"spec": {"peers": 4}})
    await eventually(lambda: "spec.peers changed from 2 to 4" in (cluster.job() or {}).get("status", {}).get("message", ""))
    assert _replicas(cluster, "digits-peer") == 2
    reasons = [r.data.get("reason") for r in cluster.k8s if r.method == "POST" and r.url.path.endswith("/events")]
    assert "PeersChangeRejected" in reasons


async def test_a_succeeded_job_exports_its_model_before_cleaning_up(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(output={"claimName": "models", "path": "digits/model.safetensors"},
                                     runPolicy={"ttlSecondsAfterFinished": 0}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("succeeded", round=10, accuracy=0.96)
    await eventually(lambda: phase(cluster) == "Succeeded")
    export = await eventually(lambda: cluster.child("batch/v1/jobs", "digits-export"))
    assert export["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "/output/digits/model.safetensors"
    assert cluster.job()["status"]["modelExport"] == "Running"  # type: ignore[index]
    # The model is still only in Redis 0: while the operator follows the running export (it reads the
    # Job several times), nothing is scaled down and the TTL (0 s) waits for it.
    reads = lambda: sum(1 for r in cluster.k8s if r.method == "GET" and r.url.path.endswith("/jobs/digits-export"))  # noqa: E731
    await eventually(lambda: reads() >= 3)
    assert cluster.job() is not None and not cluster.job()["metadata"].get("deletionTimestamp")  # type: ignore[index]
    assert _replicas(cluster, "digits-redis") == 2
    assert cluster.creates("batch/v1/jobs", "digits-export") == 1

    # The export Job completes (kmock runs no pods: the test reports it as a cluster would).
    path = "/apis/batch/v1/namespaces/default/jobs/digits-export"
    assert await cluster.request("PATCH", path, {"status": {"succeeded": 1}}, "application/merge-patch+json") < 300
    await eventually(lambda: _replicas(cluster, "digits-redis") == 0)
    await eventually(lambda: cluster.job() is None)
    reasons = [(r.data or {}).get("reason") for r in cluster.k8s if r.method == "POST" and "events" in str(r.resource)]
    assert "ExportingModel" in reasons and "ModelExported" in reasons


async def test_a_spec_broken_after_creation_is_reported_not_silently_skipped(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    await cluster.patch_job({"spec": {"aggregation": {"rule": "krum", "byzantine": 1}}})  # too few peers for krum
    # The observer (a timer: kopf logs it locally, not as an event) says why it stopped observing.
    await eventually(lambda: any(r.levelname == "WARNING" and "the spec no longer parses" in r.getMessage()
                                 and "krum" in r.getMessage() for r in caplog.records))
    assert phase(cluster) == "Created"  # not failed by a timer that guessed
