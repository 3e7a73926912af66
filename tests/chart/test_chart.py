"""The Helm chart, rendered by a real helm binary (installed by hack/install-tools.sh).

Lint, render with default and custom values, validate every built-in object offline, and check the
chart against the code: the CRD is the one in crds/, RBAC is exactly what the operator calls, and
every dashboard query names metrics the code exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import p2ptrain.metrics  # noqa: F401  (declares every peer and function metric in the default registry)
import p2ptrain_operator.metrics  # noqa: F401  (the operator's own metrics)
from p2ptrain_operator.rbac import CLEANUP_RULES, OPERATOR_RULES, grants

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "p2ptrain"
HELM = ROOT / ".tools" / "bin" / "helm"
CUSTOM = Path(__file__).with_name("custom-values.yaml")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `bash hack/install-tools.sh` (make test does)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def render(*values: str) -> list[dict[str, Any]]:
    args = ["template", "p2ptrain", str(CHART), "--namespace", "p2ptrain", "--include-crds"]
    for value in values:
        args += ["--values", value] if value.endswith(".yaml") else ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("values", [[], [str(CUSTOM)]], ids=["default", "custom"])
def test_helm_lint_strict_passes(values: list[str]) -> None:
    args = ["lint", "--strict", str(CHART)] + [a for v in values for a in ("--values", v)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("values", [[], [str(CUSTOM)]], ids=["default", "custom"])
def test_rendered_objects_are_valid(values: list[str], version: str) -> None:
    documents = render(*values)
    kinds = {d["kind"] for d in documents}
    role = "Role" if values else "ClusterRole"  # the custom values watch one namespace
    assert {"CustomResourceDefinition", "Deployment", role, f"{role}Binding", "ServiceAccount", "Service", "ConfigMap",
            "Job"} <= kinds
    for doc in documents:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            assert doc["spec"].get("selector", {}).get("matchLabels"), doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def _by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def test_default_values_install_one_recreated_operator_with_probes() -> None:
    (deployment,) = _by_kind(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["operator"] and container["image"] == "ghcr.io/p2ptrain/p2ptrain:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["P2PTRAIN_OPERATOR_IMAGE"] == "ghcr.io/p2ptrain/p2ptrain:0.1.0" and env["P2PTRAIN_OPERATOR_NAMESPACE"] == ""
    assert not _by_kind(render(), "ServiceMonitor") and not _by_kind(render(), "PodMonitor")


def test_custom_values_reach_the_objects() -> None:
    documents = render(str(CUSTOM))
    (deployment,) = _by_kind(documents, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/p2ptrain:1.2.3"
    assert {e["name"]: e["value"] for e in container["env"]}["P2PTRAIN_OPERATOR_NAMESPACE"] == "training"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "p2ptrain-operator"
    monitors = _by_kind(documents, "ServiceMonitor") + _by_kind(documents, "PodMonitor")
    assert len(monitors) == 3 and all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors)
    assert all(e["honorLabels"] for m in _by_kind(documents, "PodMonitor") for e in m["spec"]["podMetricsEndpoints"])
    (dashboard,) = _by_kind(documents, "ConfigMap")
    assert dashboard["metadata"]["labels"]["my_dashboards"] == "yes"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_values_schema_rejects_bad_values() -> None:
    result = helm("template", "p2ptrain", str(CHART), "--set", "operator.metricsPort=80")
    assert result.returncode != 0 and "metricsPort" in result.stderr
    result = helm("template", "p2ptrain", str(CHART), "--set", "operator.unknownKnob=1")
    assert result.returncode != 0 and "unknownKnob" in result.stderr


def test_chart_crd_is_identical_to_crds_folder() -> None:
    assert (CHART / "crds" / "p2ptrainingjobs.p2ptrain.dev.yaml").read_bytes() == (
        ROOT / "crds" / "p2ptrainingjobs.p2ptrain.dev.yaml"
    ).read_bytes()


def test_rbac_grants_exactly_what_the_operator_calls_cluster_wide() -> None:
    documents = [d for d in render() if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    (role,) = _by_kind(documents, "ClusterRole")
    assert grants(role["rules"]) == grants(OPERATOR_RULES)
    (binding,) = _by_kind(documents, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "p2ptrain"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "p2ptrain", "namespace": "p2ptrain"}]
    assert not _by_kind(documents, "Role") and not _by_kind(documents, "RoleBinding")


def test_a_watched_namespace_gets_a_role_there_and_nothing_cluster_wide() -> None:
    documents = render("operator.watchNamespace=training")
    assert not _by_kind(documents, "ClusterRole") and not _by_kind(documents, "ClusterRoleBinding")
    operator = [d for d in documents if "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    (role,) = _by_kind(operator, "Role")
    (binding,) = _by_kind(operator, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "training"
    assert grants(role["rules"]) == grants(OPERATOR_RULES)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "p2ptrain"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "p2ptrain", "namespace": "p2ptrain"}]
    (deployment,) = _by_kind(documents, "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["P2PTRAIN_OPERATOR_NAMESPACE"] == "training"


def _hooks(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents if "helm.sh/hook" in d["metadata"].get("annotations", {})}


@pytest.mark.parametrize("namespace", ["", "training"], ids=["cluster-wide", "one-namespace"])
def test_uninstall_runs_a_pre_delete_cleanup_hook_with_its_own_rbac(namespace: str) -> None:
    documents = render(f"operator.watchNamespace={namespace}")
    hooks = _hooks(documents)
    role = "Role" if namespace else "ClusterRole"
    assert set(hooks) == {"ServiceAccount", role, f"{role}Binding", "Job"}
    for kind, doc in hooks.items():
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete", kind
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", kind
        # The account and its rules exist before the Job runs (lower weights go first).
        assert int(annotations["helm.sh/hook-weight"]) == (0 if kind == "Job" else -10), kind
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    assert grants(hooks[role]["rules"]) == grants(CLEANUP_RULES)
    if namespace:
        assert hooks[role]["metadata"]["namespace"] == hooks[f"{role}Binding"]["metadata"]["namespace"] == namespace
    assert hooks[f"{role}Binding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "p2ptrain-cleanup", "namespace": "p2ptrain"}]
    pod = hooks["Job"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "p2ptrain-cleanup" and pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["args"] == ["operator", "cleanup", "--timeout", "120"]
    assert container["image"] == "ghcr.io/p2ptrain/p2ptrain:0.1.0"
    assert {e["name"]: e["value"] for e in container["env"]} == {"P2PTRAIN_OPERATOR_NAMESPACE": namespace}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False and pod["securityContext"]["runAsNonRoot"]
    assert hooks["Job"]["spec"]["activeDeadlineSeconds"] > 120  # the command's own timeout fits in it


def test_the_cleanup_hook_can_be_turned_off() -> None:
    assert _hooks(render("cleanup.enabled=false")) == {}


def _exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("p2ptrain_"):
            continue
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def test_every_dashboard_query_uses_exported_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "p2ptrain.json").read_text())
    exported = _exported_names()
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 15
    used = set()
    for expr in expressions:
        for name in re.findall(r"\b(p2ptrain_[a-z0-9_]+)", expr):
            assert name in exported, f"dashboard queries {name}, which the code does not export"
            used.add(name)
    # The dashboard covers what the README promises: rounds, loss, accuracy, phases, functions, exchange.
    for needed in ("p2ptrain_rounds_total", "p2ptrain_loss", "p2ptrain_accuracy", "p2ptrain_round_phase_seconds_bucket",
                   "p2ptrain_function_cold_starts_total", "p2ptrain_exchange_sent_bytes_total",
                   "p2ptrain_events_rejected_total", "p2ptrain_peers_excluded_total", "p2ptrain_operator_jobs"):
        assert needed in used
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


def test_every_alert_uses_exported_metrics() -> None:
    rules = yaml.safe_load((CHART / "rules" / "p2ptrain.rules.yaml").read_text())
    exported = _exported_names()
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert expressions
    for expr in expressions:
        names = re.findall(r"\b(p2ptrain_[a-z0-9_]+)", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"an alert queries {name}, which p2ptrain/metrics.py does not declare"
