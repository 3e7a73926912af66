"""The Helm chart on a real control plane: installed with default values and with every option on,
upgraded, and uninstalled with a job running, where the pre-delete hook Job really runs (its pod's
command run by the kubelet stand-in, as the hook's ServiceAccount) and Helm waits for it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import run_cleanup
from p2ptrain_operator.settings import Settings
from tests.cluster.conftest import CRD_NAME, RELEASE, RELEASE_NAMESPACE, RESTRICTED, RunningOperator
from tests.cluster.controlplane import HELM, ROOT, ControlPlane, wait_for
from tests.cluster.kubelet import run_pod
from tests.cluster.objects import collection, get, pods, wait_phase

CHART = str(ROOT / "charts" / "p2ptrain")
OPERATOR_POD = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "operator"}


def _digits(name: str) -> str:
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    manifest["metadata"]["name"] = name
    return yaml.safe_dump(manifest)


def test_the_default_install_runs_its_operator_pod_under_restricted_pod_security(cluster: ControlPlane) -> None:
    release = cluster.helm("status", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json").stdout
    assert '"status":"deployed"' in release.replace(" ", "")
    # The Deployment's ReplicaSet made the operator's pod past PodSecurity "restricted".
    wait_for(lambda: pods(cluster, RELEASE_NAMESPACE, OPERATOR_POD), 60, "the operator's pod")
    dashboards = cluster.request("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}/configmaps?labelSelector=grafana_dashboard=1")
    assert [d["metadata"]["name"] for d in dashboards["items"]] == [f"{RELEASE}-dashboard"]
    role = get(cluster, f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}")
    assert role is not None and role["rules"]


def test_helm_upgrade_reconfigures_the_operator_and_keeps_jobs_and_the_crd(cluster: ControlPlane, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=_digits("survivor"))
    crd_before = cluster.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    cluster.helm("upgrade", RELEASE, CHART, "-n", RELEASE_NAMESPACE, "--reuse-values", "--set", "operator.pollSeconds=3")
    deployment = cluster.request("GET", f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}/deployments/{RELEASE}")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["P2PTRAIN_OPERATOR_POLL_SECONDS"] == "3"
    assert get(cluster, f"/apis/p2ptrain.dev/v1alpha1/namespaces/{namespace}/p2ptrainingjobs/survivor") is not None
    crd_after = cluster.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    assert crd_after["metadata"]["resourceVersion"] == crd_before["metadata"]["resourceVersion"]


def _hook_command(cluster: ControlPlane) -> Any:
    """What the hook's container does (``p2ptrain operator cleanup --timeout N`` with the pod's env), as
    the pod's ServiceAccount: the kubelet stand-in runs it."""
    def run(pod: dict[str, Any]) -> int:
        container = pod["spec"]["containers"][0]
        args = container["args"]
        assert args[:2] == ["operator", "cleanup"], args
        settings = Settings.from_env({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        namespace = pod["metadata"]["namespace"]
        token = cluster.service_account_token(namespace, pod["spec"]["serviceAccountName"])
        connection = Connection(server=cluster.server, token_file=str(token), ca_path=str(cluster.ca))
        return run_cleanup(connection, settings.namespace, float(args[args.index("--timeout") + 1]), poll=0.5)
    return run


def test_every_option_on_then_uninstall_with_a_job_running(
    knative: ControlPlane, monitoring_crds: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    cluster = knative
    release, release_namespace = "p2ptrain-all", f"{namespace}-system"
    values = {
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"watchNamespace": namespace},
        "monitoring": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
                       "podMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
                       "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}}},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    with cluster.namespace(release_namespace, RESTRICTED):
        cluster.helm("install", release, CHART, "-n", release_namespace, "-f", str(tmp_path / "values.yaml"))
        for plural in ("servicemonitors", "podmonitors", "prometheusrules"):
            items = cluster.request("GET", f"/apis/monitoring.coreos.com/v1/namespaces/{release_namespace}/{plural}")["items"]
            assert items and all(i["metadata"]["labels"]["release"] == "kube-prometheus-stack" for i in items), plural
        assert get(cluster, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{release}") is not None

        operator = RunningOperator(cluster, release, release_namespace)
        try:
            assert operator.settings.namespace == namespace and operator.settings.image_pull_secrets == ("regcred",)
            cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", stdin=_digits("running"))
            wait_phase(cluster, namespace, "running", "Created")
            peer_pods = wait_for(lambda: pods(cluster, namespace, {"app.kubernetes.io/instance": "running"}), 60, "pods")
            assert all(p["spec"]["imagePullSecrets"] == [{"name": "regcred"}] for p in peer_pods)
            children = [f"{collection(*kind, namespace)}/{o['metadata']['name']}"
                        for kind in (("apps/v1", "StatefulSet"), ("v1", "Secret"), ("serving.knative.dev/v1", "Service"))
                        for o in cluster.request("GET", collection(*kind, namespace))["items"]
                        if any(r["name"] == "running" for r in o["metadata"].get("ownerReferences", []))]
            assert len(children) == 4, children

            uninstall = subprocess.Popen([str(HELM), f"--kubeconfig={cluster.kubeconfig}", "uninstall", release,
                                          "-n", release_namespace, "--timeout", "5m"],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=cluster.helm_env())
            try:
                hook = run_pod(cluster, release_namespace, {"app.kubernetes.io/instance": release,
                                                            "app.kubernetes.io/component": "cleanup"},
                               _hook_command(cluster))
                output, _ = uninstall.communicate(timeout=180)
            finally:
                if uninstall.poll() is None:
                    uninstall.kill()
            assert uninstall.returncode == 0, output
        finally:
            operator.stop()
        assert hook["metadata"]["ownerReferences"][0]["kind"] == "Job"
        assert get(cluster, f"/apis/p2ptrain.dev/v1alpha1/namespaces/{namespace}/p2ptrainingjobs/running") is None
        for child in children:
            wait_for(lambda c=child: get(cluster, c) is None, 60, f"{child} garbage-collected")
        # The hook's own objects went with it (hook-succeeded), and so did the release's.
        assert get(cluster, f"/apis/batch/v1/namespaces/{release_namespace}/jobs/{release}-cleanup") is None
        assert get(cluster, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{release}") is None
        assert get(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}") is not None
