"""The real kopf operator against kmock, an emulated Kubernetes API server: shared test harness.

No Kubernetes API server can run here, so kmock (by kopf's author) stands in for it. Its known gaps
shape these tests: it has no resourceVersion/uid/generation (the tests set them on the job), no
garbage collection (cascading deletion is asserted through owner references, which a real cluster
follows), ignores labelSelector (the operator filters pods itself), and replays existing objects on
every watch (so create handlers can run more than once: idempotence is what is tested). It does
implement deletion with finalizers as a cluster does (deletionTimestamp first, the object goes when
its last finalizer is removed). Peers are stood in for by a small HTTP server that answers
``/status`` the way real peers do.

Every request is recorded with its User-Agent: ``kopf/…`` and ``p2ptrain-operator`` are the
operator, ``p2ptrain-cleanup`` the uninstall hook, anything else the test itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import kmock

from p2ptrain.redis_server import free_port
from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import run_cleanup, run_in_thread
from p2ptrain_operator.settings import Settings

JOBS = "p2ptrain.dev/v1alpha1/p2ptrainingjobs"
ALL_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
RESOURCES: dict[str, dict[str, Any]] = {
    JOBS: {"kind": "P2PTrainingJob", "namespaced": True, "verbs": ALL_VERBS, "subresources": {"status"}},
    # What every cluster serves: an operator that scanned them would need cluster-wide RBAC.
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "verbs": {"list", "watch", "get"}},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {"kind": "CustomResourceDefinition", "namespaced": False,
                                                          "verbs": {"list", "watch", "get"}},
    "v1/secrets": {"kind": "Secret", "namespaced": True, "verbs": ALL_VERBS},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "verbs": ALL_VERBS},
    "v1/services": {"kind": "Service", "namespaced": True, "verbs": ALL_VERBS},
    "v1/pods": {"kind": "Pod", "namespaced": True, "verbs": ALL_VERBS},
    "v1/events": {"kind": "Event", "namespaced": True, "verbs": {"create"}},
    "apps/v1/statefulsets": {"kind": "StatefulSet", "namespaced": True, "verbs": ALL_VERBS},
    "serving.knative.dev/v1/services": {"kind": "Service", "namespaced": True, "verbs": ALL_VERBS},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "verbs": ALL_VERBS},
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
FINALIZER = "p2ptrain.dev/finalizer"
OPERATOR_AGENTS = ("kopf/", "p2ptrain-operator")
CLEANUP_AGENTS = ("p2ptrain-cleanup",)
AGGREGATOR = -1  # FakePeers.reports key of a topology-ps job's aggregator
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}


def job_manifest(name: str = "digits", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": "1", "generation": 1},
        "spec": {"peers": 2, "model": {"name": "mlp"}, "dataset": {"name": "digits"}, **spec},
    }


class FakePeers:
    """Answers GET /<job>/<index> like a peer's /status endpoint; tests set what each peer reports."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, int], dict[str, Any]] = {}
        self.polls = 0  # requests answered: proves the operator's timer ran
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                _, job, index = self.path.split("/")
                # topology ps: the aggregator answers at /<job>/aggregator (AGGREGATOR: its key here)
                report = fake.reports.get((job, int(index) if index.isdigit() else AGGREGATOR))
                body = json.dumps(report).encode()
                fake.polls += 1
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

    @property
    def aggregator_url_template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{{job}}/aggregator"

    def report(self, state: str, peers: int = 2, job: str = "digits", **fields: Any) -> None:
        for index in range(peers):
            self.reports[(job, index)] = {"peer": index, "state": state, "round": 5, "rounds": 10,
                                          "epoch": 0.5, "loss": 0.4, "accuracy": 0.9, **fields}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class Call:
    """One API request in RBAC terms."""

    group: str
    resource: str  # with its subresource: p2ptrainingjobs/status
    verb: str
    namespace: str | None


@dataclass
class Cluster:
    k8s: kmock.KubernetesEmulator
    url: str
    peers: FakePeers
    operators: list[tuple[threading.Thread, threading.Event]] = field(default_factory=list)

    def settings(self, namespace: str = "") -> Settings:
        return Settings(poll_seconds=0.3, peer_status_url=self.peers.url_template, image="p2ptrain:test",
                        namespace=namespace, aggregator_status_url=self.peers.aggregator_url_template)

    @property
    def connection(self) -> Connection:
        return Connection(server=self.url, insecure=True)

    def start_operator(self, namespace: str = "") -> None:
        self.operators.append(run_in_thread(self.settings(namespace), self.connection))

    def stop_operator(self) -> None:
        thread, stop = self.operators.pop()
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the operator did not stop"

    def cleanup(self, namespace: str = "", timeout: float = 10.0) -> int:
        """The uninstall hook's command (``p2ptrain operator cleanup``) against this cluster."""
        return run_cleanup(self.connection, namespace, timeout, poll=0.1)

    def job(self, name: str = "digits") -> dict[str, Any] | None:
        return self.child(JOBS, name)

    def child(self, resource: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[kmock.resource(resource), "default", name]
        except KeyError:
            return None
        return None if obj.deleted else dict(obj.raw)

    def versions(self, resource: str, name: str) -> list[dict[str, Any]]:
        """Every state the object had, deleted ones included (kmock keeps its history)."""
        try:
            obj = self.k8s.objects[kmock.resource(resource), "default", name]
        except KeyError:
            return []
        return [dict(v.raw) for v in obj.history.raw if v is not None]

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> int:
        async with aiohttp.ClientSession() as session, session.request(
            method, self.url + path, data=json.dumps(body) if body is not None else None,
            headers={"Content-Type": content_type},
        ) as response:
            return response.status

    async def apply(self, manifest: dict[str, Any]) -> None:
        assert await self.request("POST", "/apis/p2ptrain.dev/v1alpha1/namespaces/default/p2ptrainingjobs", manifest) < 300

    async def patch_job(self, patch: dict[str, Any], name: str = "digits") -> None:
        path = f"/apis/p2ptrain.dev/v1alpha1/namespaces/default/p2ptrainingjobs/{name}"
        assert await self.request("PATCH", path, patch, "application/merge-patch+json") < 300

    def creates(self, resource: str, name: str) -> int:
        """POSTs of ``name`` to ``resource`` by anyone (409s included)."""
        return sum(
            1 for r in self.k8s
            if r.method == "POST" and r.resource is not None and str(r.resource) == str(kmock.resource(resource))
            and (r.data or {}).get("metadata", {}).get("name") == name
        )

    def calls(self, agents: tuple[str, ...]) -> list[Call]:
        """Every resource request made by a client whose User-Agent starts with one of ``agents``."""
        result = []
        for request in self.k8s:
            if not request.headers.get("User-Agent", "").startswith(agents):
                continue
            if request.resource is None or request.resource.plural is None:
                continue  # discovery (/api, /apis/...): allowed to every authenticated user
            verb = VERBS[str(request.method.value).upper()]
            if verb == "get" and request.name is None:
                verb = "watch" if request.params.get("watch") == "true" else "list"
            plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            result.append(Call(request.resource.group or "", plural, verb, request.namespace))
        return result


def phase(cluster: Cluster, name: str = "digits") -> str | None:
    return (cluster.job(name) or {}).get("status", {}).get("phase")


async def eventually(check: Callable[[], Any], timeout: float = 10.0, describe: Callable[[], str] | None = None) -> Any:
    """Wait until ``check()`` is truthy (polled every 50 ms) and return its value; ``describe`` explains a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}" + (f": {describe()}" if describe else ""))
        await asyncio.sleep(0.05)
