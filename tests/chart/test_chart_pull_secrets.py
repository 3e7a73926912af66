"""The chart's imagePullSecrets reach the operator, and through it every job's pods (real helm template).

The operator side (Settings -> builders) is tested in tests/unit/test_builders.py; this checks the
chart half: the value becomes the operator's P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS, which
Settings.from_env reads back to the same names.
"""

from __future__ import annotations

from typing import Any

from p2ptrain_operator.settings import Settings
from tests.chart.test_chart import CHART, helm, render


def _operator(*values: str) -> dict[str, Any]:
    (deployment,) = [d for d in render(*values) if d["kind"] == "Deployment"]
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"]}


def test_pull_secrets_value_reaches_the_operator_env_and_pod() -> None:
    pod = _operator("imagePullSecrets[0].name=regcred", "imagePullSecrets[1].name=mirror.creds")
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.creds"}]
    env = _env(pod)
    assert env["P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS"] == "regcred,mirror.creds"
    assert Settings.from_env(env).image_pull_secrets == ("regcred", "mirror.creds")


def test_no_pull_secrets_by_default() -> None:
    pod = _operator()
    assert "imagePullSecrets" not in pod
    assert Settings.from_env(_env(pod)).image_pull_secrets == ()


def test_a_bad_secret_name_is_refused_by_the_values_schema() -> None:
    result = helm("template", "p2ptrain", str(CHART), "--set", "imagePullSecrets[0].name=Reg_Cred")
    assert result.returncode != 0
    assert "imagePullSecrets/0/name" in result.stderr and "Reg_Cred" in result.stderr
