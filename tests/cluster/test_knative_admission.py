"""The operator's gradient-function Service judged by Knative Serving's own admission webhook, running
as an admission webhook of the real control plane (``knative_admission``): Knative's defaulting, then
the CRD's schema, then Knative's validation, with Knative's ConfigMaps at their released defaults.

Every example with a gradient function (and the cuda variant) is admitted with default feature flags,
except the one whose data set is on a PersistentVolumeClaim: refused until the cluster enables the flag
the operator names. What Knative must refuse is refused, so the webhook is proven to be the judge, and
the fast pre-check of tests/unit (``knative_admission``) refuses the same.

The webhook is Knative's stock ``cmd/webhook`` of knative.dev/serving
v0.47.1-0.20251204213410-5fbd94e8a6d7, with the CRDs of the same release; not v0.51.0, the newest,
whose pinned dependencies the module proxy does not serve: see hack/cluster/knative/go.mod.
"""

from __future__ import annotations

import copy
import re
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2ptrain.spec import parse_manifest
from p2ptrain_operator.builders import PVC_FLAG, _pod_security, build_knative_service, knative_flags_needed
from p2ptrain_operator.settings import Settings
from tests.cluster.conftest import RunningOperator
from tests.cluster.controlplane import ROOT, ControlPlane, wait_for
from tests.cluster.knative_webhook import KnativeWebhook, refusal_message
from tests.cluster.objects import JOBS, collection, contains, get, job_status, path_of, wait_phase
from tests.unit.knative_admission import admit_service, flags_needed

SETTINGS = Settings(image="registry.example/p2ptrain:1.2.3")
CUDA = {"function": {"device": "cuda", "resources": {"limits": {"nvidia.com/gpu": 1}}}}
SECURITY_CONTEXT_FLAG = "kubernetes.podspec-securitycontext"


def _example(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / name).read_text())
    return manifest


def _serverless(path: Path) -> bool:
    return not parse_manifest(_example(path.name)).function.inline


SERVERLESS = [p.name for p in sorted((ROOT / "examples").glob("*.yaml")) if _serverless(p)]
CASES: list[tuple[str, str | None, dict[str, Any]]] = [(name, None, {}) for name in SERVERLESS] + [("digits.yaml", "digits-cuda", CUDA)]


def _manifest(example: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
    manifest = _example(example)
    manifest["metadata"]["name"] = name or manifest["metadata"]["name"]
    manifest["spec"].update(copy.deepcopy(spec))
    return manifest


def _job(cluster: ControlPlane, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The job as the API server stored it."""
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    stored = get(cluster, f"{JOBS}/namespaces/{namespace}/p2ptrainingjobs/{manifest['metadata']['name']}")
    assert stored is not None
    return stored


def _built(namespace: str, example: str, **spec: Any) -> dict[str, Any]:
    """The Service as the operator builds it, for an owner that is never stored (only for Services
    that are refused or dry-run, so no garbage collector looks for their owner)."""
    manifest = _manifest(example, **spec)
    manifest["metadata"].update(namespace=namespace, uid="0b7e0d4e-1111-4a4a-9c9c-123456789abc")
    return build_knative_service(parse_manifest(manifest), manifest, SETTINGS)


def _create(cluster: ControlPlane, service: dict[str, Any], dry_run: bool = False) -> str | None:
    """None if the API server (and every webhook) accepted ``service``, else the refusal's message."""
    query = "?dryRun=All" if dry_run else ""
    try:
        cluster.request("POST", collection("serving.knative.dev/v1", "Service", service["metadata"]["namespace"]) + query,
                        service)
    except urllib.error.HTTPError as exc:
        return refusal_message(exc)
    return None


def _quantities_as_strings(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for container in spec["template"]["spec"]["containers"]:
        for kind, quantities in container.get("resources", {}).items():
            container["resources"][kind] = {name: str(value) for name, value in quantities.items()}
    return spec


def _unindexed(text: str) -> str:
    return re.sub(r"\[\d+\]", "", text)


def _refused_by_knative(message: str | None) -> bool:
    return message is not None and 'admission webhook "validation.webhook.serving.knative.dev" denied' in message


# --- what the operator builds passes ----------------------------------------------------------------

@pytest.mark.parametrize("example,name,spec", CASES, ids=[*(n.removesuffix(".yaml") for n in SERVERLESS), "cuda"])
def test_every_gradient_service_passes_knatives_defaulting_and_validation(
    knative_admission: KnativeWebhook, namespace: str, example: str, name: str | None, spec: dict[str, Any]
) -> None:
    cluster = knative_admission.cluster
    # As the operator builds it, with the stored job as its owner (no operator runs in this test).
    job = _job(cluster, namespace, _manifest(example, name, **spec))
    service = build_knative_service(parse_manifest(job), job, SETTINGS)
    flags = knative_flags_needed(parse_manifest(job))

    if flags:
        # A data set on a claim: Knative refuses it with default flags, as the operator says it will.
        assert flags == [PVC_FLAG]
        refusal = _create(cluster, service)
        assert _refused_by_knative(refusal) and "Persistent volume claim support is disabled" in (refusal or ""), refusal
        with knative_admission.features(dict.fromkeys(flags, "enabled")):
            wait_for(lambda: _create(cluster, service) is None, 30, f"Knative to admit {example} with {flags}")
        again = copy.deepcopy(service)
        again["metadata"]["name"] += "-again"
        wait_for(lambda: _refused_by_knative(_create(cluster, again, dry_run=True)), 30, "Knative's default flags again")
    else:
        assert _create(cluster, service) is None
    assert flags_needed(admit_service(service)) == set(flags)  # tests/unit's pre-check agrees

    stored = get(cluster, path_of(service))
    assert stored is not None
    # Knative's defaulting ran (the CRD defaults nothing of this) and changed nothing the operator sent
    # but the spelling of resource quantities: Knative writes them back as strings (1 -> "1").
    annotations = stored["metadata"]["annotations"]
    assert annotations["serving.knative.dev/creator"] == annotations["serving.knative.dev/lastModifier"] == "p2ptrain-test-admin"
    assert stored["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]
    assert contains(stored["spec"], _quantities_as_strings(service["spec"])) == []
    assert contains(stored["metadata"]["labels"], service["metadata"]["labels"]) == []


def test_a_dry_run_passes_knatives_pod_dry_run_under_restricted_pod_security(
    knative_admission: KnativeWebhook, namespace: str
) -> None:
    # On a dry run only, Knative also sends the revision's pod to the API server (a dry-run create):
    # the namespace enforces "restricted", so the container's securityContext alone must satisfy it.
    cluster = knative_admission.cluster
    service = _built(namespace, "digits.yaml")
    assert _create(cluster, service, dry_run=True) is None

    insecure = copy.deepcopy(service)
    del insecure["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    refusal = _create(cluster, insecure, dry_run=True)
    assert _refused_by_knative(refusal) and "dry run failed" in (refusal or "") and "restricted" in (refusal or ""), refusal


# --- what Knative must refuse is refused ----------------------------------------------------------

def _pod(service: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = service["spec"]["template"]["spec"]
    return pod


BAD = {
    "pod-security-context": (lambda pod: pod.__setitem__("securityContext", _pod_security()),
                             "must not set the field(s): spec.template.spec.securityContext"),
    "pvc-volume": (lambda pod: (pod["volumes"].append({"name": "scratch", "persistentVolumeClaim": {"claimName": "c"}}),
                                pod["containers"][0]["volumeMounts"].append({"name": "scratch", "mountPath": "/scratch"})),
                   "Persistent volume claim support is disabled"),
    "queue-proxy-port": (lambda pod: pod["containers"][0]["ports"].__setitem__(0, {"containerPort": 8012}),
                         "8012 is a reserved port"),
    "reserved-env": (lambda pod: pod["containers"][0]["env"].append({"name": "K_SERVICE", "value": "x"}),
                     '"K_SERVICE" is a reserved environment variable'),
    "mount-on-dev": (lambda pod: pod["containers"][0]["volumeMounts"].append({"name": "tmp", "mountPath": "/dev"}),
                     'mountPath "/dev" is a reserved path'),
}


@pytest.mark.parametrize("change,expected", BAD.values(), ids=BAD.keys())
def test_knative_refuses_what_it_must_and_the_unit_pre_check_agrees(
    knative_admission: KnativeWebhook, namespace: str, change: Any, expected: str
) -> None:
    cluster = knative_admission.cluster
    service = _built(namespace, "digits.yaml")
    change(_pod(service))
    refusal = _create(cluster, service)
    assert _refused_by_knative(refusal) and expected in (refusal or ""), refusal
    assert get(cluster, path_of(service)) is None
    # tests/unit's pre-check refuses it too, at a field Knative names (indexes aside: Knative leaves
    # out some, e.g. "containers[0].ports.containerPort").
    problems = admit_service(service)
    assert any(_unindexed(problem.path) in _unindexed(refusal or "") for problem in problems), (problems, refusal)


def test_a_pod_security_context_is_admitted_once_its_flag_is_on_and_refused_again_after(
    knative_admission: KnativeWebhook, namespace: str
) -> None:
    # The verdict follows Knative's config-features: proof that its validation, not the CRD, decides.
    cluster = knative_admission.cluster
    service = _built(namespace, "digits.yaml")
    _pod(service)["securityContext"] = _pod_security()
    with knative_admission.features({SECURITY_CONTEXT_FLAG: "enabled"}):
        wait_for(lambda: _create(cluster, service, dry_run=True) is None, 30, f"Knative to admit it with {SECURITY_CONTEXT_FLAG}")
    wait_for(lambda: _refused_by_knative(_create(cluster, service, dry_run=True)), 30, "Knative to refuse it again")


# --- through the operator (last: the module's operator acts on every job applied after it starts) ---

def test_the_operator_creates_its_service_through_knatives_webhook(
    knative_admission: KnativeWebhook, operator: RunningOperator, namespace: str
) -> None:
    cluster = knative_admission.cluster
    job = _job(cluster, namespace, _manifest("digits.yaml", "through-operator"))
    wait_phase(cluster, namespace, "through-operator", "Created")
    stored = get(cluster, path_of(build_knative_service(parse_manifest(job), job, operator.settings)))
    assert stored is not None
    # Knative's defaulting recorded who created it: the operator, as the chart's ServiceAccount.
    assert stored["metadata"]["annotations"]["serving.knative.dev/creator"].startswith("system:serviceaccount:p2ptrain-system:")


def test_a_job_knative_refuses_gets_no_pods_says_why_and_goes_on_once_the_flag_is_on(
    knative_admission: KnativeWebhook, operator: RunningOperator, namespace: str
) -> None:
    """cnn-pvc needs Knative's PVC flag: without it, the gradient function (created before anything
    that starts pods) is refused; the job says so and waits; once the admin enables the flag it goes on."""
    cluster = knative_admission.cluster
    name = "needs-pvc-flag"
    _job(cluster, namespace, _manifest("cnn-pvc.yaml", name))
    status = wait_for(lambda: (s := job_status(cluster, namespace, name)).get("conditions") and s, 60, "a condition")
    created = next(c for c in status["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "KnativeRefused"), created
    assert "Persistent volume claim support is disabled" in created["message"] and PVC_FLAG in created["message"]
    assert cluster.request("GET", collection("apps/v1", "StatefulSet", namespace))["items"] == []
    with knative_admission.features({PVC_FLAG: "enabled"}):
        wait_phase(cluster, namespace, name, "Created", timeout=90)
        assert get(cluster, f"{collection('apps/v1', 'StatefulSet', namespace)}/{name}-peer") is not None

