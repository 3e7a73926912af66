"""The real kopf operator against kmock, an emulated Kubernetes API server.

No Kubernetes API server can run here, so kmock (by kopf's author) stands in for it. Its known gaps
shape these tests: it has no resourceVersion/uid/generation (the tests set them on the job), no
garbage collection (cascading deletion is asserted through owner references, which a real cluster
follows), ignores labelSelector (the operator filters pods itself), and replays existing objects on
every watch (so create handlers run more than once: idempotence is what is tested). Peers are stood in
for by a small HTTP server that answers ``/status`` the way real peers do.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import kmock
import pytest

from p2ptrain.redis_server import free_port
from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import run_in_thread
from p2ptrain_operator.rbac import allows
from p2ptrain_operator.settings import Settings

JOBS = "p2ptrain.dev/v1alpha1/p2ptrainingjobs"
CHILD_VERBS = {"list", "watch", "get", "create", "patch", "delete"}
RESOURCES = {
    JOBS: {"kind": "P2PTrainingJob", "namespaced": True, "verbs": CHILD_VERBS, "subresources": {"status"}},
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "verbs": {"list", "watch", "get"}},
    "v1/secrets": {"kind": "Secret", "namespaced": True, "verbs": CHILD_VERBS},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "verbs": CHILD_VERBS},
    "v1/services": {"kind": "Service", "namespaced": True, "verbs": CHILD_VERBS},
    "v1/pods": {"kind": "Pod", "namespaced": True, "verbs": {"list", "watch", "get"}},
    "v1/events": {"kind": "Event", "namespaced": True, "verbs": {"create"}},
    "apps/v1/statefulsets": {"kind": "StatefulSet", "namespaced": True, "verbs": CHILD_VERBS},
    "serving.knative.dev/v1/services": {"kind": "Service", "namespaced": True, "verbs": CHILD_VERBS},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "verbs": CHILD_VERBS},
}
CHILDREN = [
    ("v1/secrets", "digits-secrets"),
    ("v1/configmaps", "digits-config"),
    ("v1/services", "digits-redis"),
    ("apps/v1/statefulsets", "digits-redis"),
    ("v1/services", "digits-peers"),
    ("apps/v1/statefulsets", "digits-peer"),
    ("serving.knative.dev/v1/services", "digits-gradient"),
]


def job_manifest(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "digits", "namespace": "default", "uid": "uid-digits", "resourceVersion": "1", "generation": 1},
        "spec": {"peers": 2, "model": {"name": "mlp"}, "dataset": {"name": "digits"}, **spec},
    }


class FakePeers:
    """Answers GET /<job>/<index> like a peer's /status endpoint; tests set what each peer reports."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, int], dict[str, Any]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                _, job, index = self.path.split("/")
                report = fake.reports.get((job, int(index)))
                body = json.dumps(report).encode()
                self.send_response(200 if report else 503)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{{job}}/{{index}}"

    def report(self, state: str, peers: int = 2, **fields: Any) -> None:
        for index in range(peers):
            self.reports[("digits", index)] = {"peer": index, "state": state, "round": 5, "rounds": 10,
                                               "epoch": 0.5, "loss": 0.4, "accuracy": 0.9, **fields}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Cluster:
    k8s: kmock.KubernetesEmulator
    url: str
    peers: FakePeers
    operators: list[tuple[threading.Thread, threading.Event]] = field(default_factory=list)

    def start_operator(self) -> None:
        settings = Settings(poll_seconds=0.3, peer_status_url=self.peers.url_template, image="p2ptrain:test")
        self.operators.append(run_in_thread(settings, Connection(server=self.url, insecure=True)))

    def stop_operator(self) -> None:
        thread, stop = self.operators.pop()
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the operator did not stop"

    def job(self) -> dict[str, Any] | None:
        return self.child(JOBS, "digits")

    def child(self, resource: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[kmock.resource(resource), "default", name]
        except KeyError:
            return None
        return None if obj.deleted else dict(obj.raw)

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> int:
        async with aiohttp.ClientSession() as session, session.request(
            method, self.url + path, data=json.dumps(body) if body is not None else None,
            headers={"Content-Type": content_type},
        ) as response:
            return response.status

    async def apply(self, manifest: dict[str, Any]) -> None:
        assert await self.request("POST", "/apis/p2ptrain.dev/v1alpha1/namespaces/default/p2ptrainingjobs", manifest) < 300

    async def patch_job(self, patch: dict[str, Any]) -> None:
        path = "/apis/p2ptrain.dev/v1alpha1/namespaces/default/p2ptrainingjobs/digits"
        assert await self.request("PATCH", path, patch, "application/merge-patch+json") < 300

    def creates(self, resource: str, name: str) -> int:
        return sum(
            1 for r in self.k8s
            if r.method == "POST" and r.resource is not None and str(r.resource) == str(kmock.resource(resource))
            and (r.data or {}).get("metadata", {}).get("name") == name
        )


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.05)


@pytest.fixture
def fake_peers() -> Iterator[FakePeers]:
    peers = FakePeers()
    yield peers
    peers.close()


@pytest.fixture
async def cluster(fake_peers: FakePeers) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        for key, info in RESOURCES.items():
            k8s.resources[key] = kmock.ResourceInfo(**info)
        k8s.objects["v1/namespaces", None, "default"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        result = Cluster(k8s, str(server.url).rstrip("/"), fake_peers)
        try:
            yield result
        finally:
            while result.operators:
                await asyncio.to_thread(result.stop_operator)


def _phase(cluster: Cluster) -> str | None:
    job = cluster.job()
    return (job or {}).get("status", {}).get("phase")


async def test_applying_a_job_creates_every_child_exactly_once(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Created")
    await eventually(lambda: all(cluster.child(r, n) for r, n in CHILDREN))
    await asyncio.sleep(1.0)  # let replays and timers run
    for resource, name in CHILDREN:
        assert len(cluster.k8s.objects[kmock.resource(resource), "default", name].history) == 1, f"{resource}/{name} changed"
        owners = cluster.child(resource, name)["metadata"]["ownerReferences"]  # type: ignore[index]
        assert owners[0]["uid"] == "uid-digits" and owners[0]["controller"] is True  # deletion cascades
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["peersReadyText"] == "0/2" and {c["type"] for c in status["conditions"]} >= {"Created", "Running"}


async def test_operator_restart_resumes_without_duplicates_and_keeps_the_secret(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: cluster.child("serving.knative.dev/v1/services", "digits-gradient"))
    secret = cluster.child("v1/secrets", "digits-secrets")
    await asyncio.to_thread(cluster.stop_operator)
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: cluster.creates("v1/secrets", "digits-secrets") >= 2)  # the resume handler ran
    await asyncio.sleep(0.5)
    assert cluster.child("v1/secrets", "digits-secrets") == secret
    for resource, name in CHILDREN:
        assert len(cluster.k8s.objects[kmock.resource(resource), "default", name].history) == 1


async def test_status_follows_the_peers_to_success_and_cleans_up_pods(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Created")
    cluster.peers.report("training", round=7, loss=0.5, accuracy=0.8)
    await eventually(lambda: _phase(cluster) == "Running")
    status = await eventually(lambda: (cluster.job() or {}).get("status", {}).get("round") == 7 and cluster.job()["status"])  # type: ignore[index]
    assert status["peersReadyText"] == "2/2" and status["loss"] == 0.5 and status["accuracy"] == 0.8
    cluster.peers.report("succeeded", round=10, accuracy=0.96)
    await eventually(lambda: _phase(cluster) == "Succeeded")
    status = cluster.job()["status"]  # type: ignore[index]
    assert status["completionTime"] and {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    peers = await eventually(lambda: cluster.child("apps/v1/statefulsets", "digits-peer")["spec"]["replicas"] == 0)  # type: ignore[index]
    assert peers


async def test_a_failed_peer_fails_the_job_with_its_message(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("training")
    cluster.peers.reports[("digits", 1)] = {"peer": 1, "state": "failed", "message": "cannot reach Redis"}
    await eventually(lambda: _phase(cluster) == "Failed")
    assert "cannot reach Redis" in cluster.job()["status"]["message"]  # type: ignore[index]


async def test_a_finished_job_is_never_recreated(cluster: Cluster) -> None:
    manifest = job_manifest()
    manifest["status"] = {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}
    await cluster.apply(manifest)
    await asyncio.to_thread(cluster.start_operator)
    await asyncio.sleep(1.5)
    await asyncio.to_thread(cluster.stop_operator)
    await asyncio.to_thread(cluster.start_operator)
    await asyncio.sleep(1.0)
    assert all(cluster.child(r, n) is None for r, n in CHILDREN)
    assert _phase(cluster) == "Succeeded"


async def test_ttl_after_finished_deletes_the_job_on_time(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(runPolicy={"ttlSecondsAfterFinished": 2}))
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("succeeded")
    await eventually(lambda: _phase(cluster) == "Succeeded")
    finished = time.monotonic()
    await eventually(lambda: cluster.job() is None or cluster.job()["metadata"].get("deletionTimestamp"), timeout=10)  # type: ignore[index]
    elapsed = time.monotonic() - finished
    assert 0.5 <= elapsed <= 3.5, f"deleted {elapsed:.1f}s after completion, TTL is 2s"


async def test_suspend_scales_to_zero_and_resume_scales_back(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Created")
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: _phase(cluster) == "Suspended")
    for name in ("digits-peer", "digits-redis"):
        await eventually(lambda name=name: cluster.child("apps/v1/statefulsets", name)["spec"]["replicas"] == 0)  # type: ignore[index,misc]
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: _phase(cluster) == "Created")
    await eventually(lambda: cluster.child("apps/v1/statefulsets", "digits-peer")["spec"]["replicas"] == 3)  # type: ignore[index]


async def test_an_invalid_job_fails_with_the_reason(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3, aggregation={"rule": "krum", "byzantine": 1}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Failed")
    assert "too few for krum" in cluster.job()["status"]["message"]  # type: ignore[index]
    assert all(cluster.child(r, n) is None for r, n in CHILDREN)


async def test_every_api_call_is_covered_by_the_rbac_rules(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(peers=3))
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("succeeded", peers=3)
    await eventually(lambda: _phase(cluster) == "Succeeded")
    await cluster.patch_job({"spec": {"runPolicy": {"suspend": True}}})
    await asyncio.sleep(0.5)
    verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}
    checked = 0
    for request in cluster.k8s:
        if request.resource is None or request.resource.plural is None or "aiohttp" in request.headers.get("User-Agent", ""):
            continue  # discovery, or the test's own requests
        verb = verbs[str(request.method.value).upper()]
        if verb == "get" and request.name is None:
            verb = "watch" if request.params.get("watch") == "true" else "list"
        plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        assert allows(request.resource.group or "", plural, verb), f"RBAC lacks {verb} {request.resource.group}/{plural}"
        checked += 1
    assert checked > 10


async def test_changing_peers_of_a_created_job_is_refused_with_a_message(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Created")
    await cluster.patch_job({"spec": {"peers": 4}})
    await eventually(lambda: "spec.peers changed from 2 to 4" in (cluster.job() or {}).get("status", {}).get("message", ""))
    assert cluster.child("apps/v1/statefulsets", "digits-peer")["spec"]["replicas"] == 2  # type: ignore[index]
    reasons = [r.data.get("reason") for r in cluster.k8s if r.method == "POST" and r.url.path.endswith("/events")]
    assert "PeersChangeRejected" in reasons


async def test_a_succeeded_job_exports_its_model_before_cleaning_up(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(output={"claimName": "models", "path": "digits/model.safetensors"},
                                     runPolicy={"ttlSecondsAfterFinished": 0}))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: _phase(cluster) == "Created")
    cluster.peers.report("succeeded", round=10, accuracy=0.96)
    await eventually(lambda: _phase(cluster) == "Succeeded")
    export = await eventually(lambda: cluster.child("batch/v1/jobs", "digits-export"))
    assert export["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "/output/digits/model.safetensors"
    assert cluster.job()["status"]["modelExport"] == "Running"  # type: ignore[index]
    # The model is still only in Redis 0: nothing is scaled down and the TTL (0 s) waits for the export.
    await asyncio.sleep(1.5)
    assert cluster.job() is not None and not cluster.job()["metadata"].get("deletionTimestamp")  # type: ignore[index]
    assert cluster.child("apps/v1/statefulsets", "digits-redis")["spec"]["replicas"] == 2  # type: ignore[index]
    assert cluster.creates("batch/v1/jobs", "digits-export") == 1

    # The export Job completes (kmock runs no pods: the test reports it as a cluster would).
    path = "/apis/batch/v1/namespaces/default/jobs/digits-export"
    assert await cluster.request("PATCH", path, {"status": {"succeeded": 1}}, "application/merge-patch+json") < 300
    await eventually(lambda: cluster.child("apps/v1/statefulsets", "digits-redis")["spec"]["replicas"] == 0)  # type: ignore[index]
    await eventually(lambda: cluster.job() is None or cluster.job()["metadata"].get("deletionTimestamp"))  # type: ignore[index]
    reasons = [(r.data or {}).get("reason") for r in cluster.k8s if r.method == "POST" and "events" in str(r.resource)]
    assert "ExportingModel" in reasons and "ModelExported" in reasons
