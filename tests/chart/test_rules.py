"""The chart's alerts: one rule file, checked and unit-tested by a real ``promtool``, shipped as a
PrometheusRule only when asked for, with the thresholds from values in place of the file's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.test_chart import CHART, _by_kind, helm, render

RULES = CHART / "rules" / "p2ptrain.rules.yaml"
RULE_TESTS = Path(__file__).with_name("p2ptrain.rules.test.yaml")
# The Prometheus Operator's own CRD (vendored, offline): what its API server admits as a PrometheusRule.
UPSTREAM_CRD = Path(__file__).parent / "upstream" / "monitoring.coreos.com_prometheusrules.yaml"
ALERTS = {"P2PTrainJobFailed", "P2PTrainPeerExcluded", "P2PTrainEventsRejected", "P2PTrainFunctionErrors",
          "P2PTrainSlowRound", "P2PTrainOperatorReconcileErrors"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: run `bash hack/install-prometheus.sh` (make test does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_rule_file_passes_promtool_check_and_every_alert_has_a_unit_test() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_alerts(yaml.safe_load(RULES.read_text())["groups"])) == ALERTS
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == ALERTS


def test_alerts_fire_when_they_should_and_stay_quiet_otherwise() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_is_rendered_only_when_enabled() -> None:
    assert not _by_kind(render(), "PrometheusRule")
    documents = render("monitoring.prometheusRule.enabled=true",
                       "monitoring.prometheusRule.additionalLabels.release=kube-prometheus-stack")
    (rule,) = _by_kind(documents, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # With default thresholds the shipped rules are the tested file, unchanged.
    assert rule["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}


def test_thresholds_from_values_replace_the_rule_file_defaults(tmp_path: Path) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["prometheusRule"]["thresholds"]
    source = RULES.read_text()
    for name, value in defaults.items():
        assert re.findall(rf"([0-9.]+) # threshold:{name}\n", source) == [str(value)], name
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"monitoring": {"prometheusRule": {"enabled": True, "thresholds": {
        "excludedRounds": 7, "rejectedEvents": 20, "functionErrorRatio": 0.25, "slowRoundFactor": 4.5}}}}))
    lint = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    (rule,) = _by_kind(render(str(values)), "PrometheusRule")
    alerts = _alerts(rule["spec"]["groups"])
    assert ">= 7 # threshold:excludedRounds" in alerts["P2PTrainPeerExcluded"]["expr"]
    assert "> 20 # threshold:rejectedEvents" in alerts["P2PTrainEventsRejected"]["expr"]
    assert "> 0.25 # threshold:functionErrorRatio" in alerts["P2PTrainFunctionErrors"]["expr"]
    assert "> 4.5 # threshold:slowRoundFactor" in alerts["P2PTrainSlowRound"]["expr"]
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    result = promtool("check", "rules", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_thresholds_are_refused_by_the_values_schema() -> None:
    result = helm("template", "p2ptrain", str(CHART), "--set", "monitoring.prometheusRule.thresholds.excludedRounds=0")
    assert result.returncode != 0 and "excludedRounds" in result.stderr
    result = helm("template", "p2ptrain", str(CHART), "--set", "monitoring.prometheusRule.thresholds.roundsBehind=2")
    assert result.returncode != 0 and "roundsBehind" in result.stderr


def _unknown_fields(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields a structural CRD schema does not declare: the API server would silently prune them."""
    if isinstance(value, list):
        return [u for i, item in enumerate(value) for u in _unknown_fields(item, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    properties = schema.get("properties")
    if properties is None:
        extra = schema.get("additionalProperties")
        nested = extra if isinstance(extra, dict) else {}
        return [u for key, item in value.items() for u in _unknown_fields(item, nested, f"{path}.{key}")]
    unknown = [f"{path}.{key}" for key in value if key not in properties]
    return unknown + [u for key, item in value.items() if key in properties
                      for u in _unknown_fields(item, properties[key], f"{path}.{key}")]


def test_rendered_prometheus_rule_is_admitted_by_the_upstream_crd_schema() -> None:
    crd = yaml.safe_load(UPSTREAM_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    (rule,) = _by_kind(render("monitoring.prometheusRule.enabled=true"), "PrometheusRule")
    # Not jsonschema.validate: it checks the schema's patterns as Python regexes, and one upstream
    # pattern ("^(?i)...") is valid only for Go's RE2. It belongs to a field we do not set.
    jsonschema.Draft7Validator(schema).validate(rule)
    assert _unknown_fields(rule, schema, "") == []
