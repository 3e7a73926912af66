"""Fixtures of the cluster tier: one real control plane for the whole tier (started on free loopback
ports, and stopped once the tier's last test is done, so it costs the other tiers nothing), the chart
installed as users install it (which installs the CRD), the upstream CRDs a cluster with Knative and
the Prometheus Operator has, the operator running as the chart's ServiceAccount, and a namespace per
test that enforces the ``restricted`` Pod Security Standard, as a hardened cluster's job namespaces do."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator

import pytest

from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import run_in_thread
from p2ptrain_operator.settings import Settings
from tests.cluster.controlplane import ROOT, UPSTREAM_CRDS, ControlPlane, wait_for
from tests.cluster.knative_webhook import KnativeWebhook
from tests.cluster.objects import crd_established
from tests.operator.harness import FakePeers

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
CRD_NAME = "p2ptrainingjobs.p2ptrain.dev"
RELEASE, RELEASE_NAMESPACE = "p2ptrain", "p2ptrain-system"
KNATIVE_CRDS = ["services", "configurations", "revisions", "routes"]
_names = itertools.count()


@pytest.fixture(scope="package")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane() as plane:
        yield plane


@pytest.fixture(scope="package")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    """The control plane after `helm install` of the chart with default values (CRD, operator, RBAC)."""
    control_plane.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": RELEASE_NAMESPACE, "labels": RESTRICTED}})
    control_plane.helm("install", RELEASE, str(ROOT / "charts" / "p2ptrain"), "-n", RELEASE_NAMESPACE)
    wait_for(lambda: crd_established(control_plane, CRD_NAME), 60, f"CRD {CRD_NAME} to be established")
    return control_plane


def install_knative_crds(cluster: ControlPlane) -> None:
    """Knative Serving's own CRDs (of the release pinned in hack/cluster/upstream/go.mod)."""
    for name in KNATIVE_CRDS:
        cluster.kubectl("apply", "--server-side", "-f", str(UPSTREAM_CRDS / f"{name[:-1]}.yaml"))
    for name in KNATIVE_CRDS:
        wait_for(lambda n=name: crd_established(cluster, f"{n}.serving.knative.dev"), 60, f"{name}.serving.knative.dev")


@pytest.fixture
def knative(cluster: ControlPlane) -> ControlPlane:
    install_knative_crds(cluster)  # idempotent: a test may have removed them
    return cluster


@pytest.fixture(scope="package")
def monitoring_crds(cluster: ControlPlane) -> ControlPlane:
    """The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs."""
    for name in ("servicemonitors", "podmonitors", "prometheusrules"):
        cluster.kubectl("apply", "--server-side", "-f", str(UPSTREAM_CRDS / f"monitoring.coreos.com_{name}.yaml"))
        wait_for(lambda n=name: crd_established(cluster, f"{n}.monitoring.coreos.com"), 60, f"{name}.monitoring.coreos.com")
    return cluster


class RunningOperator:
    """The operator of a Helm release, configured by the environment of the release's Deployment and
    authenticated with a token of the release's ServiceAccount, so the API server enforces the
    chart's RBAC on every call. It runs in a thread of this process (kopf), since no node runs its
    pod. Peers never run either: their ``/status`` is answered by ``peers``, which tests set."""

    def __init__(self, cluster: ControlPlane, release: str, release_namespace: str) -> None:
        deployment = cluster.request("GET", f"/apis/apps/v1/namespaces/{release_namespace}/deployments/{release}")
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
        self.peers = FakePeers()
        self.settings = dataclasses.replace(
            Settings.from_env(env), poll_seconds=0.5, peer_status_url=self.peers.url_template,
            aggregator_status_url=self.peers.aggregator_url_template,
        )
        token = cluster.service_account_token(release_namespace, pod["serviceAccountName"])
        connection = Connection(server=cluster.server, token_file=str(token), ca_path=str(cluster.ca))
        self.thread, self.stop_flag = run_in_thread(self.settings, connection)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        self.peers.close()
        assert not self.thread.is_alive(), "the operator did not stop"


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane) -> Iterator[RunningOperator]:
    """The default release's operator (every namespace, a ClusterRole), for one test module: two
    operators watching one namespace would both act on its jobs."""
    running = RunningOperator(cluster, RELEASE, RELEASE_NAMESPACE)
    yield running
    running.stop()


@pytest.fixture
def namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace enforcing the restricted Pod Security Standard, deleted after the test."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    with cluster.namespace(f"{stem}-{next(_names)}", RESTRICTED) as name:
        yield name


@pytest.fixture(scope="package")
def knative_webhook(cluster: ControlPlane) -> Iterator[KnativeWebhook]:
    """Knative Serving's own webhook, running as Knative installs it (tests/cluster/knative_webhook.py).
    The apiserver calls it only inside ``knative_admission``."""
    install_knative_crds(cluster)
    webhook = KnativeWebhook(cluster)
    try:
        webhook.start()
        yield webhook
    finally:
        webhook.stop()


@pytest.fixture(scope="module")
def knative_admission(knative_webhook: KnativeWebhook) -> Iterator[KnativeWebhook]:
    """Knative's webhook as an admission webhook of the cluster, for one test module: the apiserver
    sends it every Knative resource (and Knative's ConfigMaps) created or changed. Other modules'
    Knative has CRDs only, as before."""
    install_knative_crds(knative_webhook.cluster)
    with knative_webhook.admitting():
        yield knative_webhook
