"""Pod Security "restricted" holds for every pod the operator creates (checker: pod_security.py).

A namespace labelled ``pod-security.kubernetes.io/enforce: restricted`` admits the peers, Redis, the
export Job and the gradient function's pods. For the function the pod that runs is Knative's: the
user container plus queue-proxy, whose securityContext Knative fixes itself
(pkg/reconciler/revision/resources/queue.go ``queueSecurityContext``), so it is checked with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.spec import load_manifest, parse_manifest
from p2ptrain_operator.builders import build_children, build_export_job
from p2ptrain_operator.settings import Settings
from tests.unit.pod_security import violations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SETTINGS = Settings(image="registry.example/p2ptrain:1.2.3", image_pull_secrets=("regcred",))
QUEUE_PROXY = {
    "name": "queue-proxy",
    "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue",
    "ports": [{"name": "http-queueadm", "containerPort": 8022}],
    "securityContext": {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    },
}


def _pods(spec: Any) -> dict[str, dict[str, Any]]:
    owner = {"metadata": {"name": spec.name, "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}
    objects = build_children(spec, owner, SETTINGS, redis_password="pw", signing_key="key")
    if spec.output is not None:
        objects.append(build_export_job(spec, owner, SETTINGS))
    pods: dict[str, dict[str, Any]] = {}
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if template is None:
            continue
        pod = copy.deepcopy(template["spec"])
        if obj["apiVersion"] == "serving.knative.dev/v1":
            pod = {k: v for k, v in pod.items() if k not in ("containerConcurrency", "timeoutSeconds")}
            pod["containers"].append(QUEUE_PROXY)
        pods[f"{obj['kind']}/{obj['metadata']['name']}"] = pod
    return pods


def _job(**extra: Any) -> Any:
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "digits"},
        "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, **extra},
    })


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_pod_of_every_example_is_restricted(example: Path) -> None:
    spec = load_manifest(example)
    pods = _pods(spec)
    # Every example has StatefulSet pods; all but the inline ones (no function) a Knative Service's.
    assert {key.split("/")[0] for key in pods} >= {"StatefulSet"} | (set() if spec.function.inline else {"Service"})
    for key, pod in pods.items():
        assert violations(pod) == [], key


def test_persistent_redis_and_export_pods_are_restricted() -> None:
    pods = _pods(_job(redis={"persistence": "aof", "storage": "1Gi"}, output={"claimName": "models"},
                      dataset={"name": "path", "path": "/data/x", "claimName": "data"}))
    assert sorted(pods) == ["Job/digits-export", "Service/digits-gradient", "StatefulSet/digits-peer",
                            "StatefulSet/digits-redis"]
    for key, pod in pods.items():
        assert violations(pod) == [], key


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["containers"][0]
    return container


@pytest.mark.parametrize(("change", "expected"), [
    (lambda pod: _container(pod)["securityContext"].pop("seccompProfile"), "seccompProfile.type"),
    (lambda pod: _container(pod)["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    (lambda pod: _container(pod)["securityContext"].update(runAsUser=0), "runAsUser must not be 0"),
    (lambda pod: _container(pod)["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda pod: _container(pod)["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "drop must include ALL"),
    (lambda pod: _container(pod)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "SYS_ADMIN"),
    (lambda pod: _container(pod)["securityContext"].update(privileged=True), "privileged"),
    (lambda pod: _container(pod)["ports"].append({"containerPort": 80, "hostPort": 80}), "hostPort"),
    (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
    (lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath volumes"),
    (lambda pod: pod.update(securityContext={"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}), "kernel.msgmax"),
], ids=["seccomp", "nonroot", "root-uid", "escalation", "drop", "add", "privileged", "host-port", "host-network",
        "host-path", "sysctl"])
def test_the_checker_refuses_each_broken_control(change: Callable[[dict[str, Any]], Any], expected: str) -> None:
    pod = _pods(_job())["Service/digits-gradient"]
    assert violations(pod) == []
    change(pod)
    problems = violations(pod)
    assert any(expected in p for p in problems), problems


def test_pod_level_settings_count_for_containers_that_leave_them_unset() -> None:
    pod = _pods(_job())["StatefulSet/digits-peer"]
    security = _container(pod)["securityContext"]
    for key in ("runAsNonRoot", "seccompProfile"):
        security.pop(key)
    assert violations(pod) == []
    pod["securityContext"].pop("seccompProfile")
    assert any("seccompProfile" in p for p in violations(pod))
