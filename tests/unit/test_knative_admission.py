"""The gradient function's Knative Service passes Knative Serving's admission with default feature flags.

No Knative webhook runs here: ``knative_admission`` ports its rules from Knative's Go source (see
that module). The first tests prove the port refuses what the real webhook refuses; the rest run
the operator's Service for every example job through it, at knative-v1.16.0 and at main.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.spec import load_manifest, parse_manifest
from p2ptrain_operator.builders import (
    PVC_FLAG,
    _pod_security,
    build_knative_service,
    knative_annotations,
    knative_flags_needed,
    knative_warnings,
)
from p2ptrain_operator.settings import Settings
from tests.unit.knative_admission import VERSIONS, Problem, admit_service, flags_needed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SETTINGS = Settings(image="registry.example/p2ptrain:1.2.3", image_pull_secrets=("regcred",))


def _owner(spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": spec.name, "namespace": spec.namespace, "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}


def _service(**extra: Any) -> dict[str, Any]:
    spec = parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "digits"},
        "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, **extra},
    })
    return build_knative_service(spec, _owner(spec), SETTINGS)


def _pod(service: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = service["spec"]["template"]["spec"]
    return pod


def _paths(problems: list[Problem]) -> set[str]:
    return {p.path for p in problems}


# --- the checker refuses what Knative refuses -------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_pod_level_security_context_is_refused_without_its_flag(version: str) -> None:
    # What the builder produced before: the pod-level securityContext of the StatefulSets.
    service = _service()
    _pod(service)["securityContext"] = _pod_security()
    problems = admit_service(service, version=version)
    assert _paths(problems) == {"spec.template.spec.securityContext"}
    assert problems[0].message == "must not set the field(s)"
    assert flags_needed(problems) == {"kubernetes.podspec-securitycontext"}
    assert admit_service(service, version=version, enabled={"kubernetes.podspec-securitycontext"}) == []


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("change", "path"), [
    (lambda pod, c: c["ports"].append({"containerPort": 9102}), "spec.template.spec.containers[*].ports"),
    (lambda pod, c: c["ports"].__setitem__(0, {"containerPort": 9090}), "spec.template.spec.containers[0].ports[0].containerPort"),
    (lambda pod, c: c["ports"].__setitem__(0, {"containerPort": 8012}), "spec.template.spec.containers[0].ports[0].containerPort"),
    (lambda pod, c: c["ports"].__setitem__(0, {"containerPort": 8080, "name": "metrics"}), "spec.template.spec.containers[0].ports[0].name"),
    (lambda pod, c: c["env"].append({"name": "K_SERVICE", "value": "x"}), "spec.template.spec.containers[0].env[5].name"),
    (lambda pod, c: c["env"].append({"name": "PORT", "value": "1"}), "spec.template.spec.containers[0].env[5].name"),
    (lambda pod, c: c["volumeMounts"].append({"name": "tmp", "mountPath": "/dev"}), "spec.template.spec.containers[0].volumeMounts[2].mountPath"),
    (lambda pod, c: c["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp/"}), "spec.template.spec.containers[0].volumeMounts[2].mountPath"),
    (lambda pod, c: c["readinessProbe"].update(periodSeconds=0, timeoutSeconds=3), "spec.template.spec.containers[0].readinessProbe.timeoutSeconds"),
    (lambda pod, c: c["readinessProbe"]["httpGet"].update(port="metrics"), "spec.template.spec.containers[0].readinessProbe.httpGet.port"),
    (lambda pod, c: c["livenessProbe"].update(tcpSocket={}), "spec.template.spec.containers[0].livenessProbe"),
    (lambda pod, c: c.update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}), "spec.template.spec.containers[0].lifecycle"),
    (lambda pod, c: c["securityContext"].update(privileged=True), "spec.template.spec.containers[0].securityContext.privileged"),
    (lambda pod, c: c["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
     "spec.template.spec.containers[0].securityContext.capabilities.add"),
    (lambda pod, c: c.update(name="queue-proxy"), "spec.template.spec.containers[0].name"),
    (lambda pod, c: pod.update(timeoutSeconds=601), "spec.template.spec.timeoutSeconds"),
    (lambda pod, c: pod.update(containerConcurrency=1001), "spec.template.spec.containerConcurrency"),
    (lambda pod, c: pod.update(restartPolicy="Always"), "spec.template.spec.restartPolicy"),
    (lambda pod, c: pod.update(automountServiceAccountToken=True), "spec.template.spec.automountServiceAccountToken"),
    (lambda pod, c: pod.update(nodeSelector={"gpu": "yes"}), "spec.template.spec.nodeSelector"),
    (lambda pod, c: pod["volumes"].append({"name": "logs", "hostPath": {"path": "/var/log"}}), "spec.template.spec.volumes[2].name"),
    (lambda pod, c: pod["volumes"].append({"name": "extra", "emptyDir": {}}), "spec.template.spec.volumes[2].name"),
], ids=["two-ports", "queue-proxy-metrics-port", "queue-proxy-port", "port-name", "env-K_SERVICE", "env-PORT",
        "reserved-path", "duplicate-path", "probe-timeout", "probe-port", "two-handlers", "lifecycle", "privileged",
        "add-capability", "container-name", "timeout", "concurrency", "restart-policy", "automount",
        "node-selector", "host-path", "unmounted-volume"])
def test_hand_made_bad_services_are_refused(version: str, change: Any, path: str) -> None:
    service = _service()
    pod = _pod(service)
    change(pod, pod["containers"][0])
    assert path in _paths(admit_service(service, version=version))


@pytest.mark.parametrize(("annotation", "value"), [
    ("window", "5s"), ("window", "2h"), ("window", "7.5s"), ("window", "30"),
    ("min-scale", "-1"), ("max-scale", "two"), ("initial-scale", "0"), ("target", "0.001"),
    ("target-utilization-percentage", "101"), ("scale-to-zero-pod-retention-period", "2h"),
    ("class", "foo.autoscaling.knative.dev"), ("metric", "cpu"),
])
def test_bad_autoscaling_annotations_are_refused(annotation: str, value: str) -> None:
    service = _service()
    service["spec"]["template"]["metadata"]["annotations"][f"autoscaling.knative.dev/{annotation}"] = value
    problems = admit_service(service)
    assert any(p.path.endswith(f"autoscaling.knative.dev/{annotation}") for p in problems), problems


def test_max_scale_below_min_scale_and_annotations_on_the_service_are_refused() -> None:
    service = _service()
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    annotations.update({"autoscaling.knative.dev/min-scale": "5", "autoscaling.knative.dev/max-scale": "2"})
    service["metadata"]["annotations"] = {"autoscaling.knative.dev/window": "10s"}
    assert _paths(admit_service(service)) == {
        "spec.template.metadata.annotations.autoscaling.knative.dev/max-scale",
        "metadata.annotations.autoscaling.knative.dev/window",
    }


def test_a_writable_claim_needs_the_write_flag_as_well() -> None:
    service = _service(dataset={"name": "path", "path": "/data/x", "claimName": "data"})
    copy_ = copy.deepcopy(service)
    _pod(copy_)["volumes"][-1]["persistentVolumeClaim"]["readOnly"] = False
    _pod(copy_)["containers"][0]["volumeMounts"][-1]["readOnly"] = False
    assert flags_needed(admit_service(copy_)) == {PVC_FLAG, "kubernetes.podspec-persistent-volume-write"}


# --- the operator's Service is admitted -------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_job_is_admitted_with_default_flags_or_names_its_flag(example: Path, version: str) -> None:
    spec = load_manifest(example)
    service = build_knative_service(spec, _owner(spec), SETTINGS)
    problems = admit_service(service, version=version)
    needed = knative_flags_needed(spec)
    # What the checker says the Service needs is exactly what the operator says it needs.
    assert flags_needed(problems) == set(needed), problems
    assert admit_service(service, version=version, enabled=needed) == []
    assert ("claimName" in example.read_text()) == (needed == [PVC_FLAG])


def test_claim_dataset_needs_the_pvc_flag_and_nothing_else() -> None:
    service = _service(dataset={"name": "path", "path": "/data/x", "claimName": "data"})
    problems = admit_service(service)
    assert flags_needed(problems) == {PVC_FLAG}
    assert _paths(problems) == {"spec.template.spec.volumes[2].persistentVolumeClaim"}


def test_container_carries_the_restricted_security_and_no_queue_proxy_port() -> None:
    service = _service()
    pod = _pod(service)
    assert "securityContext" not in pod and pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "runAsUser": 10001, "runAsGroup": 10001, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The function serves /metrics on its one (user) port; queue-proxy owns 9090/9091 in the pod.
    assert container["ports"] == [{"containerPort": 8080}]
    assert "--metrics-port" not in container["args"]


# --- what function.* means on a cluster -------------------------------------------------------------

def test_annotations_map_the_function_spec_to_knative_meanings() -> None:
    annotations = _service(function={"minScale": 1, "maxScale": 6, "containerConcurrency": 2, "idleSeconds": 45})[
        "spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "autoscaling.knative.dev/min-scale": "1",
        "autoscaling.knative.dev/max-scale": "6",
        # idleSeconds is the stable window (idle time before scaling down), not the retention
        # period that Knative adds after the window.
        "autoscaling.knative.dev/window": "45s",
        "autoscaling.knative.dev/target-utilization-percentage": "100",
    }
    unlimited = _service(function={"containerConcurrency": 0})["spec"]["template"]
    assert "autoscaling.knative.dev/target-utilization-percentage" not in unlimited["metadata"]["annotations"]
    assert unlimited["spec"]["containerConcurrency"] == 0


@pytest.mark.parametrize(("idle", "window"), [(0, "6s"), (2.5, "6s"), (6, "6s"), (30.2, "31s"), (3600, "3600s")])
def test_idle_seconds_become_a_window_knative_accepts(idle: float, window: str) -> None:
    spec = parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "digits"},
        "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "function": {"idleSeconds": idle}},
    })
    assert knative_annotations(spec)["autoscaling.knative.dev/window"] == window
    assert admit_service(build_knative_service(spec, _owner(spec), SETTINGS)) == []
    warnings = knative_warnings(spec)
    if float(window[:-1]) == idle:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "function.idleSeconds" in warnings[0] and f"after {window}" in warnings[0]


def test_no_annotation_needs_a_cluster_setting() -> None:
    # initial-scale "0" needs allow-zero-initial-scale; the builder never sets initial-scale at all.
    annotations = _service(function={"minScale": 0})["spec"]["template"]["metadata"]["annotations"]
    assert not any(key.endswith(("initial-scale", "initialScale")) for key in annotations)
    assert "autoscaling.knative.dev/scale-to-zero-pod-retention-period" not in annotations
