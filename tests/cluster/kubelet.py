"""A stand-in for the kubelet, for the one pod a test needs to run to completion: the chart's
pre-delete hook. The control plane has no node (no kubelet, no container runtime), so the test does
the kubelet's part by hand: it runs the pod's command as the pod would (its arguments, its
environment, a token of its ServiceAccount) and reports the exit in the pod's status, from which the
real Job controller completes the Job and Helm goes on."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from tests.cluster.controlplane import ControlPlane, wait_for
from tests.cluster.objects import pods

MERGE_PATCH = "application/merge-patch+json"


def run_pod(cluster: ControlPlane, namespace: str, labels: dict[str, str],
            command: Callable[[dict[str, Any]], int], timeout: float = 120) -> dict[str, Any]:
    """Wait for the pod labelled ``labels``, run ``command(pod)`` in its stead and record the exit
    code in its status as a kubelet would; the pod as it was when it was run."""
    pod: dict[str, Any] = wait_for(lambda: next(iter(pods(cluster, namespace, labels)), None), timeout,
                                   f"a pod labelled {labels} in {namespace}")
    started = _now()
    code = command(pod)
    container = pod["spec"]["containers"][0]
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started,
                  "finishedAt": _now()}
    status = {
        "phase": "Succeeded" if code == 0 else "Failed",
        "startTime": started,
        "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                               "restartCount": 0, "started": False, "state": {"terminated": terminated}}],
    }
    cluster.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status",
                    {"status": status}, content_type=MERGE_PATCH)
    return pod


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
