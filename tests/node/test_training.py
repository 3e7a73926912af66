"""Jobs trained by pods on a real node, as users run them: the chart installed by ``helm install``,
a manifest applied with ``kubectl apply``, progress read with ``kubectl get p2ptrainingjobs``.

Peers and Redis servers run as the operator's StatefulSets in the project's image (its entrypoints,
its non-root user, its probes on real ports), find each other by the headless Services' DNS names
(CoreDNS), and report to the operator, which runs as the chart's pod and polls them. While a job
runs, the test reads every peer's ``/status`` at its pod's address, as the operator does, so the
replicas' parameter hashes can be compared round by round (``ReplicaCheck``) even across a peer's
deletion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from safetensors import safe_open

from p2ptrain.config import PEER_PORT
from p2ptrain.status import ReplicaCheck
from tests.cluster import objects
from tests.cluster.conftest import RELEASE, RELEASE_NAMESPACE
from tests.cluster.controlplane import ROOT, ControlPlane, wait_for
from tests.node.conftest import NodeCluster

EXAMPLE = ROOT / "examples" / "digits-inline.yaml"
ACCURACY = 0.95  # the example's accuracy (README): what the job must reach as pods
JOB_TIMEOUT = 900  # seconds: pods start on two shared cores, each importing torch


def inline_job(name: str, rounds: int, output_claim: str | None = None, keep_pods: bool = False) -> dict[str, Any]:
    """examples/digits-inline.yaml as a user would adapt it: a name, more rounds, an output claim, and
    with ``keep_pods`` the pods kept after the job ends (``cleanPodPolicy: None``), so every peer's last
    status can still be read."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["rounds"] = rounds
    if keep_pods:
        manifest["spec"]["runPolicy"] = {"cleanPodPolicy": "None"}
    if output_claim:
        manifest["spec"]["output"] = {"claimName": output_claim, "path": f"models/{name}.safetensors"}
    return manifest


def pods(plane: ControlPlane, namespace: str, job: str, component: str) -> list[dict[str, Any]]:
    return objects.pods(plane, namespace, {"p2ptrain.dev/job": job, "app.kubernetes.io/component": component})


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


class Follower:
    """Follows a job as a user and as the operator would: ``kubectl get p2ptrainingjobs`` (its printed
    columns) and every peer's ``/status`` at its pod's address, once a second, in a thread."""

    def __init__(self, plane: ControlPlane, namespace: str, name: str, peers: int) -> None:
        self.plane, self.namespace, self.name = plane, namespace, name
        self.replicas = ReplicaCheck(peers)
        self.printed: list[str] = []
        self.statuses: list[dict[str, Any]] = []
        self.peer_states: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{name}", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=3) as client:
            while not self._stop.wait(1):
                with contextlib.suppress(Exception):  # a poll that fails is retried next second
                    self._poll(client)

    def read_peers(self) -> None:
        """Read every peer's ``/status`` now (after the job ended, with its pods kept)."""
        with httpx.Client(timeout=5) as client:
            self._poll(client)

    def _poll(self, client: httpx.Client) -> None:
        printed = self.plane.kubectl("get", "p2ptrainingjobs", self.name, "-n", self.namespace, "--no-headers",
                                     check=False).stdout.strip()
        if printed and (not self.printed or self.printed[-1] != printed):
            self.printed.append(printed)
        job = json.loads(self.plane.kubectl("get", "p2ptrainingjobs", self.name, "-n", self.namespace, "-o", "json").stdout)
        self.statuses.append(job.get("status", {}))
        for pod in pods(self.plane, self.namespace, self.name, "peer"):
            address = pod.get("status", {}).get("podIP")
            if not address:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                status = client.get(f"http://{address}:{PEER_PORT}/status").json()
                self.replicas.note(status)
                self.peer_states[int(status["peer"])] = status["state"]

    @property
    def status(self) -> dict[str, Any]:
        return self.statuses[-1] if self.statuses else {}

    def wait_round(self, round_number: int, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        return wait_for(lambda: self.status if int(self.status.get("round") or 0) >= round_number else None,
                        timeout, f"job {self.name} to reach round {round_number}", interval=0.5)

    def wait_phase(self, phase: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            current = self.status.get("phase")
            assert current != "Failed" or phase == "Failed", f"job {self.name} failed: {self.status}"
            return self.status if current == phase else None

        return wait_for(reached, timeout, f"job {self.name} to be {phase}", interval=0.5)


@contextlib.contextmanager
def output_volume(cluster: NodeCluster, namespace: str, name: str) -> Iterator[Path]:
    """A PersistentVolume on the node (a directory of its) bound to the claim ``name`` in ``namespace``,
    as a cluster's storage would provide; the directory on the host, where the export lands."""
    directory = cluster.node.workdir / "volumes" / f"{namespace}-{name}"
    directory.mkdir(parents=True)
    directory.chmod(0o777)  # the export runs as the image's non-root user
    volume = f"{namespace}-{name}"
    cluster.plane.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(directory), "type": "Directory"},
                  "claimRef": {"namespace": namespace, "name": name}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": volume,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]}))
    try:
        yield directory
    finally:
        cluster.plane.kubectl("delete", "pv", volume, "--wait=false", check=False)


def apply(plane: ControlPlane, namespace: str, manifest: dict[str, Any]) -> None:
    plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def replace_pod(plane: ControlPlane, namespace: str, pod_name: str, timeout: float = 300) -> dict[str, Any]:
    """``kubectl delete pod``, then the pod its StatefulSet makes again, once it is ready."""
    old = json.loads(plane.kubectl("get", "pod", pod_name, "-n", namespace, "-o", "json").stdout)
    plane.kubectl("delete", "pod", pod_name, "-n", namespace, "--wait=false")

    def recreated() -> dict[str, Any] | None:
        result = plane.kubectl("get", "pod", pod_name, "-n", namespace, "-o", "json", check=False)
        if result.returncode != 0:
            return None
        pod: dict[str, Any] = json.loads(result.stdout)
        return pod if pod["metadata"]["uid"] != old["metadata"]["uid"] and ready(pod) else None

    return wait_for(recreated, timeout, f"pod {pod_name} to be recreated and ready", interval=1)


def assert_replicas_end_identical(follow: Follower, rounds: int) -> None:
    """Every peer's parameter hash after the last round is the same (``training.resyncEveryRounds``
    repairs what a restarted peer's rounds made different in between). The job's pods are kept."""
    follow.read_peers()
    last = follow.replicas.hashes.get(rounds, {})
    assert len(last) == 4 and len(set(last.values())) == 1, (last, follow.replicas.result())


def test_the_operator_runs_as_the_charts_pod(release: NodeCluster) -> None:
    plane = release.plane
    listed = json.loads(plane.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-o", "json").stdout)["items"]
    operator = [p for p in listed if p["metadata"]["name"].startswith(f"{RELEASE}-")]
    assert len(operator) == 1 and ready(operator[0]), listed
    container = operator[0]["status"]["containerStatuses"][0]
    assert container["restartCount"] == 0 and "running" in container["state"]
    assert operator[0]["spec"]["nodeName"] == "p2ptrain-node"


def test_an_inline_job_trains_as_pods_and_survives_a_peer_deletion(release: NodeCluster, namespace: str) -> None:
    """The inline example trains to its accuracy with peers and Redis servers as pods; peer 1's pod,
    deleted mid-run, is made again and resumes from its checkpoint; the replicas stay identical; the
    job ends Succeeded and the export Job writes the model to the claim."""
    plane, name = release.plane, "digits"
    manifest = inline_job(name, rounds=300, output_claim="models", keep_pods=True)
    with output_volume(release, namespace, "models") as volume, Follower(plane, namespace, name, 4) as follow:
        started = time.monotonic()
        apply(plane, namespace, manifest)
        follow.wait_round(40)
        running_at = time.monotonic() - started
        peer = replace_pod(plane, namespace, f"{name}-peer-1")
        logs = plane.kubectl("logs", "-n", namespace, peer["metadata"]["name"]).stdout
        done = follow.wait_phase("Succeeded")
        took = time.monotonic() - started
        exported = volume / "models" / f"{name}.safetensors"
        wait_for(exported.is_file, 300, f"the export Job to write {exported}")
        print(f"\nround 40 after {running_at:.0f} s, Succeeded after {took:.0f} s; accuracy {done.get('accuracy')}")

    assert "resumed from checkpoint" in logs, logs[-3000:]
    assert float(done["accuracy"]) >= ACCURACY, done
    assert int(done["round"]) == 300
    assert_replicas_end_identical(follow, 300)
    # kubectl get p2ptrainingjobs showed the progress: the printed round (the slowest live peer's, so
    # it steps back when the deleted peer resumes from its checkpoint) rose while the job ran.
    rounds = [int(line.split()[2]) for line in follow.printed if len(line.split()) > 2 and line.split()[2].isdigit()]
    assert len(set(rounds)) >= 5 and rounds[-1] == 300, follow.printed
    assert follow.printed[-1].split()[1] == "Succeeded", follow.printed
    with safe_open(str(exported), "pt") as model:
        names = list(model.keys())
        assert names and all(model.get_tensor(n).isfinite().all() for n in names)


def test_a_deleted_redis_pod_is_recovered_from(release: NodeCluster, namespace: str) -> None:
    """README: a peer's Redis that restarts empty is waited for, the model is published again and the
    round re-run. Here its pod is deleted mid-run (an emptyDir: the new pod starts empty)."""
    plane, name = release.plane, "digits-redis"
    with Follower(plane, namespace, name, 4) as follow:
        apply(plane, namespace, inline_job(name, rounds=200, keep_pods=True))
        follow.wait_round(40)
        replace_pod(plane, namespace, f"{name}-redis-2")
        done = follow.wait_phase("Succeeded")
    assert float(done["accuracy"]) >= ACCURACY, done
    assert_replicas_end_identical(follow, 200)


# Panels that an inline job on a healthy node cannot feed, by title, and why; their queries are still
# evaluated (Prometheus must accept them).
NO_DATA_ON_THE_NODE = {
    "Gradient function invocations, by outcome": "function.mode: inline has no gradient function",
    "Gradient function duration (p50 / p95)": "function.mode: inline has no gradient function",
    "Function cold starts": "function.mode: inline has no gradient function",
    "Function instances": "function.mode: inline has no gradient function",
    "Function retries by peers": "function.mode: inline has no gradient function",
    "Excluded peer gradients, by reason": "no peer misses a round deadline in a healthy run",
    "Recovery: gradients from outboxes, peers caught up": "no peer restarts or misses an event in a healthy run",
    "Aggregator (topology: ps): round and gradients aggregated": "this job is topology p2p: it has no aggregator",
}


def scrape_targets(plane: ControlPlane, namespace: str, job: str) -> list[dict[str, Any]]:
    """What the chart's PodMonitor and ServiceMonitor select, as file_sd groups of pod addresses: the
    job's peers on their ``metrics`` port, the operator's pod on its own."""
    def ports(pod: dict[str, Any], port_name: str) -> list[str]:
        address = pod["status"].get("podIP")
        return [f"{address}:{port['containerPort']}" for container in pod["spec"]["containers"]
                for port in container.get("ports", []) if port.get("name") == port_name and address]

    peers = [t for pod in pods(plane, namespace, job, "peer") for t in ports(pod, "metrics")]
    operator = json.loads(plane.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                        "app.kubernetes.io/name=p2ptrain", "-o", "json").stdout)["items"]
    return [{"targets": peers, "labels": {"component": "peer"}},
            {"targets": [t for pod in operator for t in ports(pod, "metrics")], "labels": {"component": "operator"}}]


async def test_prometheus_scrapes_the_pods_and_the_dashboard_has_data(release: NodeCluster, namespace: str,
                                                                     tmp_path: Path) -> None:
    """A real Prometheus scrapes the job's peer pods and the operator's pod at their addresses (file
    discovery, what the chart's PodMonitor and ServiceMonitor select); every dashboard panel an inline
    job feeds has data, the others' queries are accepted."""
    from tests.integration import test_prometheus as dashboards

    plane, name = release.plane, "digits-metrics"
    queries = dashboards.dashboard_queries(name, namespace)
    assert set(NO_DATA_ON_THE_NODE) <= {title for title, _, _ in queries}, "a data-less panel left the dashboard"
    expected = [(t, r, q) for t, r, q in queries if t not in NO_DATA_ON_THE_NODE]
    workdir = tmp_path / "scrape"
    workdir.mkdir()
    targets = workdir / dashboards.TARGETS_FILE
    with Follower(plane, namespace, name, 4) as follow, dashboards.prometheus(workdir, tmp_path / "tsdb") as url:
        apply(plane, namespace, inline_job(name, rounds=5000))
        follow.wait_round(2)
        started = time.time() - 30
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 300
            while True:
                targets.write_text(json.dumps(scrape_targets(plane, namespace, name)))
                peer0 = pods(plane, namespace, name, "peer")[0]["status"]["podIP"]
                with contextlib.suppress(httpx.HTTPError):  # an outsider's garbage event: "Rejected events"
                    await client.post(f"http://{peer0}:{PEER_PORT}/", content=b"not a cloudevent",
                                      headers={"content-type": "application/cloudevents+json"})
                now = time.time()
                results = {(t, r): await dashboards.query_range(client, q, started, now) for t, r, q in expected}
                missing = [key for key, result in results.items() if not dashboards.finite_values(result)]
                if not missing:
                    break
                assert time.monotonic() < deadline, f"no data after 300 s for {missing}"
                await asyncio.sleep(2)
            for title, _, expr in queries:
                if title in NO_DATA_ON_THE_NODE:
                    await dashboards.query_range(client, expr, started, time.time())
            up = await dashboards.query_range(client, "count by (component) (up == 1)", started, time.time())
        plane.kubectl("delete", "p2ptrainingjob", name, "-n", namespace, "--timeout=180s")
    scraped = {series["metric"]["component"]: max(dashboards.finite_values([series])) for series in up}
    assert scraped == {"peer": 4, "operator": 1}, scraped
    assert {s["metric"]["peer"] for s in results[("Training loss, by peer", "A")]} == {"0", "1", "2", "3"}
    assert results[("Rejected events, by reason", "A")][0]["metric"]["reason"] == "malformed"


def test_an_out_of_memory_kill_fails_the_job_and_says_so(release: NodeCluster, namespace: str) -> None:
    """Resource limits under a real runtime: an inline job whose peers get too little memory
    (``function.resources``) is killed by the kernel's OOM killer in its memory cgroup; with
    ``backoffLimit: 0`` the first restart fails the job, and its condition and event say why."""
    plane, name = release.plane, "digits-oom"
    manifest = inline_job(name, rounds=100)
    manifest["spec"]["function"]["resources"] = {"requests": {"memory": "96Mi"}, "limits": {"memory": "96Mi"}}
    manifest["spec"]["runPolicy"] = {"backoffLimit": 0}
    with Follower(plane, namespace, name, 4) as follow:
        apply(plane, namespace, manifest)
        failed = follow.wait_phase("Failed", timeout=300)
    limit = plane.kubectl("get", "statefulset", f"{name}-peer", "-n", namespace, "-o",
                          "jsonpath={.spec.template.spec.containers[0].resources.limits.memory}").stdout
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "BackoffLimitExceeded", condition
    assert "OOMKilled (exit 137): it exceeded its memory limit" in condition["message"], condition
    events = plane.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=BackoffLimitExceeded",
                           "-o", "jsonpath={.items[*].message}").stdout
    assert "OOMKilled" in events, events
    assert limit == "96Mi"


def test_helm_uninstall_runs_the_pre_delete_hook_as_a_pod(release: NodeCluster, namespace: str) -> None:
    """`helm uninstall` with a job training: the chart's pre-delete hook Job runs as a real pod (its
    image, its ServiceAccount's token, the API through the Service ``kubernetes``), deletes the job and
    waits for the operator to release it; then the release is gone. Runs last: it removes the release."""
    plane, name = release.plane, "digits-uninstall"
    seen: dict[str, dict[str, Any]] = {}
    stop = threading.Event()

    def watch_hook() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):
                for pod in json.loads(plane.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                                    "app.kubernetes.io/component=cleanup", "-o", "json").stdout)["items"]:
                    seen[pod["metadata"]["name"]] = pod

    with Follower(plane, namespace, name, 4) as follow:
        apply(plane, namespace, inline_job(name, rounds=5000))
        follow.wait_round(5)
        watcher = threading.Thread(target=watch_hook, daemon=True)
        watcher.start()
        try:
            plane.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", "--timeout=5m", timeout=400)
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert seen, "no pod of the pre-delete hook was seen"
    finished = [p for p in seen.values() if p["status"].get("phase") == "Succeeded"]
    assert finished, {n: p["status"].get("phase") for n, p in seen.items()}
    assert finished[0]["spec"]["nodeName"] == "p2ptrain-node"
    gone = plane.kubectl("get", "p2ptrainingjob", name, "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stdout
    # Its pods go with it (owner references, the garbage collector; then kubelet stops them).
    wait_for(lambda: not pods(plane, namespace, name, "peer") and not pods(plane, namespace, name, "redis"),
             180, "the job's pods to be gone")
