"""Reading objects back from the real API server: paths by kind, lookups that wait, a replay of every
version an object had (a watch from an earlier resourceVersion), and "what we sent is what is stored"."""

from __future__ import annotations

import json
import urllib.error
from typing import Any

from tests.cluster.controlplane import ControlPlane, wait_for

JOBS = "/apis/p2ptrain.dev/v1alpha1"
# (apiVersion, kind) -> (API prefix, plural)
_PLURALS = {
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("serving.knative.dev/v1", "Service"): ("/apis/serving.knative.dev/v1", "services"),
    ("p2ptrain.dev/v1alpha1", "P2PTrainingJob"): (JOBS, "p2ptrainingjobs"),
}


def collection(api_version: str, kind: str, namespace: str) -> str:
    prefix, plural = _PLURALS[(api_version, kind)]
    return f"{prefix}/namespaces/{namespace}/{plural}"


def path_of(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{collection(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"


def get(cluster: ControlPlane, path: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = cluster.request("GET", path)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return found


def job_path(namespace: str, name: str) -> str:
    return f"{JOBS}/namespaces/{namespace}/p2ptrainingjobs/{name}"


def job_status(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    job = get(cluster, job_path(namespace, name)) or {}
    status: dict[str, Any] = job.get("status") or {}
    return status


def wait_phase(cluster: ControlPlane, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (s := job_status(cluster, namespace, name)).get("phase") == phase and s, timeout,
                    f"job {namespace}/{name} to reach phase {phase} (now {job_status(cluster, namespace, name)})")


def pods(cluster: ControlPlane, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    items: list[dict[str, Any]] = cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")["items"]
    return items


def events(cluster: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return items


def history(cluster: ControlPlane, collection_path: str, since: str) -> list[tuple[str, dict[str, Any]]]:
    """Every (event type, object) in ``collection_path`` since resourceVersion ``since``: the watch
    cache replays them, so what happened before the test looked is seen too."""
    reply = cluster.request("GET", f"{collection_path}?watch=true&resourceVersion={since}&timeoutSeconds=1")
    lines = reply.splitlines() if isinstance(reply, str) else [json.dumps(reply)]
    return [(e["type"], e["object"]) for e in map(json.loads, filter(None, lines))]


def resource_version(cluster: ControlPlane, collection_path: str) -> str:
    version: str = cluster.request("GET", collection_path)["metadata"]["resourceVersion"]
    return version


def contains(stored: Any, sent: Any) -> list[str]:
    """Where ``stored`` lost or changed what was ``sent`` (pruned fields, rewritten values): [] if none."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"expected an object, stored {stored!r}"]
        return [f".{key}{problem}" for key, value in sent.items()
                for problem in (contains(stored[key], value) if key in stored else [" was dropped"])]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f" stored {stored!r}, sent {sent!r}"]
        return [f"[{i}]{problem}" for i, (a, b) in enumerate(zip(stored, sent, strict=True)) for problem in contains(a, b)]
    return [] if stored == sent else [f" stored {stored!r}, sent {sent!r}"]


def crd_established(cluster: ControlPlane, name: str) -> bool:
    crd = get(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") or {}
    return any(c["type"] == "Established" and c["status"] == "True" for c in (crd.get("status") or {}).get("conditions") or [])
