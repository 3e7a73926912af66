"""Admission of n vs f: the CRD's CEL rules (evaluated with cel-python, as `p2ptrain validate` does)
refuse too few peers for each aggregation rule, and agree with ``aggregate.MINIMUM`` on the bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from p2ptrain.aggregate import RULES, minimum_gradients
from p2ptrain.spec import SpecError, openapi_schema, parse_manifest


def manifest(rule: str, peers: int, byzantine: int) -> dict:
    return {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "job"},
        "spec": {
            "model": {"name": "mlp"},
            "dataset": {"name": "digits"},
            "peers": peers,
            "aggregation": {"rule": rule, "byzantine": byzantine},
        },
    }


def accepted(rule: str, peers: int, byzantine: int) -> bool:
    try:
        parse_manifest(manifest(rule, peers, byzantine))
    except SpecError:
        return False
    return True


def test_the_crd_offers_exactly_the_registered_rules() -> None:
    enum = openapi_schema()["properties"]["spec"]["properties"]["aggregation"]["properties"]["rule"]["enum"]
    assert sorted(enum) == sorted(RULES)


@pytest.mark.parametrize(
    "rule,byzantine,bound",
    [
        ("bulyan", 1, 7),
        ("bulyan", 2, 11),
        ("geometric-median", 1, 3),
        ("geometric-median", 3, 7),
        ("centered-clipping", 1, 3),
        ("centered-clipping", 2, 5),
    ],
)
def test_new_rules_accept_at_the_bound_and_refuse_below_it_naming_rule_f_and_bound(
    rule: str, byzantine: int, bound: int
) -> None:
    assert parse_manifest(manifest(rule, bound, byzantine)).aggregation.rule == rule
    expected = f"spec: peers={bound - 1} is too few for {rule} with byzantine={byzantine}: needs peers >= {bound}"
    with pytest.raises(SpecError) as refused:
        parse_manifest(manifest(rule, bound - 1, byzantine))
    assert str(refused.value) == expected


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("byzantine", range(5))
def test_crd_and_minimum_gradients_agree_on_the_smallest_peer_count(rule: str, byzantine: int) -> None:
    # With the default quorum (all peers) a peer aggregates `peers` gradients, so the CRD must accept
    # exactly the peer counts that meet the rule's minimum for f = byzantine.
    smallest = next((peers for peers in range(1, 65) if accepted(rule, peers, byzantine)), None)
    if rule == "mean" and byzantine > 0:
        assert smallest is None  # the mean tolerates no Byzantine peer at any size
    else:
        assert smallest == minimum_gradients(rule, byzantine)
        assert accepted(rule, smallest + 1, byzantine)


def test_validate_command_prints_the_refusal(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest("bulyan", 6, 1)))
    result = subprocess.run(
        [sys.executable, "-m", "p2ptrain", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "peers=6 is too few for bulyan with byzantine=1: needs peers >= 7" in result.stderr
