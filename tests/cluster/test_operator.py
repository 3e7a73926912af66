"""The operator on a real control plane, as the chart's ServiceAccount (its own token, RBAC enforced):
every kind of job gets children that the API server, Pod Security (restricted) and the controllers
accept; status, conditions, events and printer columns land; suspend and resume; deletion cascades.

There is no node, so no pod runs: peers are stood in for by ``FakePeers`` (their ``/status``), and a
pod "admitted" means the StatefulSet controller created it past every admission plugin."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2ptrain.spec import parse_manifest
from p2ptrain.status import PeerState
from p2ptrain_operator.builders import build_children
from tests.cluster.conftest import KNATIVE_CRDS, RunningOperator, install_knative_crds
from tests.cluster.controlplane import ROOT, ControlPlane, wait_for
from tests.cluster.objects import (
    collection,
    contains,
    events,
    get,
    history,
    job_status,
    path_of,
    pods,
    resource_version,
    wait_phase,
)


def _manifest(example: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / example).read_text())
    if name:
        manifest["metadata"]["name"] = name
    manifest["spec"].update(copy.deepcopy(spec))
    return manifest


def _apply(cluster: ControlPlane, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def _expected_children(operator: RunningOperator, namespace: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    job = parse_manifest({**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}})
    owner = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace, "uid": "x"}}
    return build_children(job, owner, operator.settings, redis_password="x", signing_key="x")


CUDA = {"function": {"device": "cuda", "resources": {"limits": {"nvidia.com/gpu": 1}}}}
JOBS = [
    ("digits.yaml", None, {}),  # p2p, serverless
    ("digits-inline.yaml", None, {}),
    ("digits-ps.yaml", "p" * 35, {}),  # ps at its longest name: the aggregator's pods get their labels
    ("cnn-pvc.yaml", None, {}),  # data and output on PersistentVolumeClaims
    ("digits.yaml", "digits-cuda", CUDA),
]


@pytest.mark.parametrize("example,name,spec", JOBS, ids=["p2p", "inline", "ps-longest-name", "pvc", "cuda"])
def test_every_kind_of_job_gets_children_that_the_cluster_accepts(
    knative: ControlPlane, operator: RunningOperator, namespace: str, example: str, name: str | None, spec: dict[str, Any]
) -> None:
    cluster = knative
    manifest = _manifest(example, name, **spec)
    job = manifest["metadata"]["name"]
    _apply(cluster, namespace, manifest)
    status = wait_phase(cluster, namespace, job, "Created")

    for child in _expected_children(operator, namespace, manifest):
        stored = get(cluster, path_of(child))
        assert stored is not None, f"{child['kind']} {child['metadata']['name']} was not created"
        assert stored["metadata"]["ownerReferences"][0]["name"] == job
        if child["kind"] == "Secret":
            continue  # the operator draws the passwords itself
        # What the operator sent is what the server stored: nothing pruned by a schema, nothing rewritten.
        assert contains(stored["spec"] if "spec" in child else stored["data"], child.get("spec", child.get("data"))) == []
        if child["kind"] == "StatefulSet":
            # The StatefulSet controller made every pod, past Pod Security "restricted" and the rest.
            replicas = child["spec"]["replicas"]
            wait_for(lambda c=child, r=replicas: len(pods(cluster, namespace, c["spec"]["selector"]["matchLabels"])) == r,
                     60, f"{replicas} pods of {child['metadata']['name']} (events: {_failures(cluster, namespace)})")
    assert status["peersReadyText"] == f"0/{manifest['spec']['peers']}"
    assert any(c["type"] == "Created" and c["status"] == "True" for c in status["conditions"])
    assert any(e["reason"] == "ChildrenCreated" for e in events(cluster, namespace))


def _failures(cluster: ControlPlane, namespace: str) -> list[str]:
    return [e["message"] for e in events(cluster, namespace) if e.get("type") == "Warning"]


def test_progress_status_conditions_and_printer_columns(
    knative: ControlPlane, operator: RunningOperator, namespace: str
) -> None:
    cluster = knative
    job = "progress"
    _apply(cluster, namespace, _manifest("digits.yaml", job))
    wait_phase(cluster, namespace, job, "Created")
    operator.peers.report(PeerState.TRAINING, peers=4, job=job, round=7, loss=0.25, accuracy=0.875)
    status = wait_phase(cluster, namespace, job, "Running")
    assert (status["round"], status["loss"], status["accuracy"], status["peersReadyText"]) == (7, 0.25, 0.875, "4/4")
    table = cluster.kubectl("get", "p2pjobs", "-n", namespace, "--no-headers").stdout.split()
    assert table[:6] == [job, "Running", "7", "0.25", "0.875", "4/4"], table

    operator.peers.report(PeerState.SUCCEEDED, peers=4, job=job, round=100, loss=0.1, accuracy=0.95)
    status = wait_phase(cluster, namespace, job, "Succeeded")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    assert status["completionTime"]
    # cleanPodPolicy (default Running): the pods go, the job's record stays.
    for sts in (f"{job}-peer", f"{job}-redis"):
        wait_for(lambda s=sts: (get(cluster, f"{collection('apps/v1', 'StatefulSet', namespace)}/{s}") or {})
                 .get("spec", {}).get("replicas") == 0, 30, f"{sts} scaled to 0")
    assert any(e["reason"] == "AllPeersSucceeded" for e in events(cluster, namespace))


def test_a_job_created_suspended_never_gets_a_pod_until_resumed(
    knative: ControlPlane, operator: RunningOperator, namespace: str
) -> None:
    cluster = knative
    job = "sleeper"
    statefulsets, pod_list = collection("apps/v1", "StatefulSet", namespace), collection("v1", "Pod", namespace)
    since = resource_version(cluster, statefulsets)
    _apply(cluster, namespace, _manifest("digits.yaml", job, runPolicy={"suspend": True}))
    wait_phase(cluster, namespace, job, "Suspended")
    wait_for(lambda: get(cluster, f"{statefulsets}/{job}-peer"), 30, "the peers' StatefulSet")
    # Every version each StatefulSet ever had, from its creation on: never a replica while suspended.
    versions = history(cluster, statefulsets, since)
    assert {o["metadata"]["name"] for _, o in versions} == {f"{job}-peer", f"{job}-redis"}
    assert {o["spec"]["replicas"] for _, o in versions} == {0}
    assert [o for _, o in history(cluster, pod_list, since)] == []

    cluster.kubectl("patch", "-n", namespace, "p2pjob", job, "--type=merge", "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    wait_for(lambda: len(pods(cluster, namespace, {"app.kubernetes.io/instance": job, "app.kubernetes.io/component": "peer"})) == 4,
             60, "the peers' pods after resuming")
    assert job_status(cluster, namespace, job)["phase"] in ("Created", "Running")


def test_deleting_a_job_removes_every_child(knative: ControlPlane, operator: RunningOperator, namespace: str) -> None:
    cluster = knative
    manifest = _manifest("digits-ps.yaml", "doomed")
    _apply(cluster, namespace, manifest)
    wait_phase(cluster, namespace, "doomed", "Created")
    children = _expected_children(operator, namespace, manifest)
    # kopf sees the deletion through its watch, which it renews every 60 s (settings.watching.server_timeout):
    # on a loaded machine a stalled stream is only replaced then, so the wait allows for one renewal.
    cluster.kubectl("delete", "-n", namespace, "p2pjob", "doomed", "--wait=true", "--timeout=180s")
    # The operator released its finalizer; the garbage collector removes the children (and their pods).
    for child in children:
        wait_for(lambda c=child: get(cluster, path_of(c)) is None, 60, f"{child['kind']} {child['metadata']['name']} deleted")
    wait_for(lambda: pods(cluster, namespace, {"app.kubernetes.io/instance": "doomed"}) == [], 60, "the job's pods deleted")


def test_without_knative_a_serverless_job_waits_names_it_and_creates_nothing(
    cluster: ControlPlane, operator: RunningOperator, namespace: str
) -> None:
    for name in KNATIVE_CRDS:  # a cluster without Knative Serving
        cluster.kubectl("delete", "crd", f"{name}.serving.knative.dev", "--ignore-not-found", "--wait=true")
    job = "needs-knative"
    try:
        _apply(cluster, namespace, _manifest("digits.yaml", job))
        status = wait_for(lambda: (s := job_status(cluster, namespace, job)).get("conditions") and s, 30, "a condition")
        created = next(c for c in status["conditions"] if c["type"] == "Created")
        assert (created["status"], created["reason"]) == ("False", "KnativeServingMissing")
        assert "services.serving.knative.dev/v1" in created["message"] and "function.mode: inline" in created["message"]
        warnings = [e for e in events(cluster, namespace) if e["reason"] == "KnativeServingMissing"]
        assert len(warnings) == 1 and "services.serving.knative.dev/v1" in warnings[0]["message"]
        for kind in (("v1", "Secret"), ("v1", "ConfigMap"), ("apps/v1", "StatefulSet"), ("v1", "Service")):
            owned = [o for o in cluster.request("GET", collection(*kind, namespace))["items"]
                     if any(r["name"] == job for r in o["metadata"].get("ownerReferences", []))]
            assert owned == [], f"{kind[1]}s created while Knative is missing"
    finally:
        install_knative_crds(cluster)
    # Once Knative is installed, the job goes on by itself.
    wait_phase(cluster, namespace, job, "Created", timeout=60)
    assert get(cluster, f"{collection('serving.knative.dev/v1', 'Service', namespace)}/{job}-gradient") is not None


def test_a_job_that_never_needs_knative_is_created_without_it(
    knative: ControlPlane, operator: RunningOperator, namespace: str
) -> None:
    """Inline jobs have no Knative Service: the check above must not hold them back (Knative present or not)."""
    _apply(knative, namespace, _manifest("digits-inline.yaml", "inline-only"))
    wait_phase(knative, namespace, "inline-only", "Created")
    assert get(knative, f"{collection('serving.knative.dev/v1', 'Service', namespace)}/inline-only-gradient") is None


def test_the_rbac_the_operator_ran_with_is_the_charts(cluster: ControlPlane, operator: RunningOperator) -> None:
    """The tests above ran as the chart ServiceAccount's token, which the server knows as that account
    and limits to the chart's rules: children yes, nodes no."""
    token = Path(cluster.workdir / "token-p2ptrain-system-p2ptrain").read_text()
    review: dict[str, Any] = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": {"verb": "list", "resource": "nodes"}}}
    answer = cluster.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review, token=token)
    assert answer["status"]["allowed"] is False
    review["spec"]["resourceAttributes"] = {"verb": "create", "resource": "statefulsets", "group": "apps", "namespace": "x"}
    answer = cluster.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review, token=token)
    assert answer["status"]["allowed"] is True
    whoami = cluster.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, token=token)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:p2ptrain-system:p2ptrain"



def test_the_model_export_job_gets_a_pod_that_restricted_admits(
    knative: ControlPlane, operator: RunningOperator, namespace: str
) -> None:
    cluster = knative
    job = "exporter"
    manifest = _manifest("cnn-pvc.yaml", job)  # output: the claim `models`
    _apply(cluster, namespace, manifest)
    wait_phase(cluster, namespace, job, "Created")
    operator.peers.report(PeerState.SUCCEEDED, peers=manifest["spec"]["peers"], job=job)
    status = wait_phase(cluster, namespace, job, "Succeeded")
    assert status["modelExport"] == "Running"
    export = wait_for(lambda: get(cluster, f"{collection('batch/v1', 'Job', namespace)}/{job}-export"), 30, "the export Job")
    assert export["metadata"]["ownerReferences"][0]["name"] == job
    # The Job controller made its pod past Pod Security "restricted".
    wait_for(lambda: pods(cluster, namespace, {"job-name": f"{job}-export"}), 60,
             f"the export Job's pod (events: {_failures(cluster, namespace)})")


@pytest.mark.parametrize("example,name,spec", [j for j in JOBS if j[0] != "digits-inline.yaml"],
                         ids=["p2p", "ps", "pvc", "cuda"])
def test_the_gradient_functions_pods_meet_restricted(
    knative: ControlPlane, operator: RunningOperator, namespace: str, example: str, name: str | None, spec: dict[str, Any]
) -> None:
    """No Knative controller runs here to make the function's pods, so the pod its Service's template
    describes is sent to the server as a dry run: Pod Security and the rest of admission judge it."""
    cluster = knative
    manifest = _manifest(example, name, **spec)
    job = manifest["metadata"]["name"]
    _apply(cluster, namespace, manifest)
    service = wait_for(lambda: get(cluster, f"{collection('serving.knative.dev/v1', 'Service', namespace)}/{job}-gradient"),
                       60, "the gradient function's Service")
    template = service["spec"]["template"]
    pod_spec = copy.deepcopy(template["spec"])
    for index, container in enumerate(pod_spec["containers"]):
        # What Knative adds before its pods exist: a container name, and the user port on probes
        # that name none (Knative probes the container's port, 8080 when it declares none).
        container.setdefault("name", f"user-container-{index}")
        port = (container.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for action in ("httpGet", "tcpSocket", "grpc"):
                if action in container.get(probe, {}):
                    container[probe][action].setdefault("port", port)
    pod = {"apiVersion": "v1", "kind": "Pod", "spec": pod_spec,
           "metadata": {"name": f"{job}-gradient-dry-run", "labels": template.get("metadata", {}).get("labels", {})}}
    answer = cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
    assert answer["metadata"]["name"] == pod["metadata"]["name"]
