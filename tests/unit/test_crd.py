"""The CRD: structural, its CEL rules behave (checked with cel-python), and every example validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from p2ptrain.spec import crd, defaulted_spec, load_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    return found


def test_crd_is_structural_with_status_and_printer_columns() -> None:
    definition = crd()
    assert definition["spec"]["names"]["shortNames"][0] == "p2pjob"
    version = definition["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Round", "Loss", "Accuracy", "Peers-Ready", "Age"} <= columns
    for path, schema in _walk(version["schema"]["openAPIV3Schema"]):
        assert "type" in schema or schema.get("x-kubernetes-preserve-unknown-fields"), f"{path or '<root>'} has no type"


def test_crd_file_in_the_package_is_the_one_in_crds() -> None:
    assert crd() == yaml.safe_load((ROOT / "crds" / "p2ptrainingjobs.p2ptrain.dev.yaml").read_text())


def _rules() -> dict[str, str]:
    spec_schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return {rule["message"]: rule["rule"] for rule in spec_schema["x-kubernetes-validations"]}


def _holds(rule: str, spec: dict[str, Any]) -> bool:
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(defaulted_spec(spec))}))


@pytest.mark.parametrize(
    "message,spec,expected",
    [
        ("aggregation.rule=krum needs peers > 2*byzantine + 2", {"peers": 4, "aggregation": {"rule": "krum", "byzantine": 1}}, False),
        ("aggregation.rule=krum needs peers > 2*byzantine + 2", {"peers": 5, "aggregation": {"rule": "krum", "byzantine": 1}}, True),
        ("aggregation.rule=median/trimmed-mean needs peers > 2*byzantine", {"peers": 2, "aggregation": {"rule": "median", "byzantine": 1}}, False),
        ("set either spec.rounds or spec.epochs, not both", {"rounds": 3, "epochs": 1}, False),
        ("set either spec.rounds or spec.epochs, not both", {"rounds": 3}, True),
        ("exchange.quorum cannot exceed peers", {"peers": 2, "exchange": {"quorum": 3}}, False),
        ("aggregation.rule=mean tolerates no Byzantine peer: set aggregation.byzantine=0 or pick a robust rule",
         {"aggregation": {"rule": "mean", "byzantine": 1}}, False),
    ],
)
def test_cel_rules_evaluate_as_the_api_server_would(message: str, spec: dict[str, Any], expected: bool) -> None:
    base = {"model": {}, "dataset": {}}
    assert _holds(_rules()[message], {**base, **spec}) is expected


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd(path: Path) -> None:
    spec = load_manifest(path)
    assert spec.name == yaml.safe_load(path.read_text())["metadata"]["name"]
