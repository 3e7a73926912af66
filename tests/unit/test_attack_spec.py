"""``spec.evaluation.attack`` (evaluation only): refused unless the job says it is an evaluation, with a
message naming the field, by the CRD's own CEL rules and by ``p2ptrain validate``; parsed otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from p2ptrain.cli import main
from p2ptrain.spec import AttackSpec, SpecError, parse_manifest, spec_from_dict


def _manifest(attack: dict[str, Any] | None = None, peers: int = 5) -> dict[str, Any]:
    evaluation: dict[str, Any] = {"attack": attack} if attack is not None else {}
    return {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "eval"},
            "spec": {"peers": peers, "rounds": 1, "model": {"name": "mlp"}, "dataset": {"name": "digits"},
                     "evaluation": evaluation}}


def _attack(**fields: Any) -> dict[str, Any]:
    return {"acknowledge": "evaluation-only", "kind": "scaling", "peers": [4], **fields}


def test_an_acknowledged_attack_is_parsed_with_the_crd_defaults_and_survives_a_round_trip() -> None:
    spec = parse_manifest(_manifest(_attack(kind="alie", peers=[3, 4], z=1.5)))
    attack = spec.evaluation.attack
    assert attack == AttackSpec(kind="alie", peers=(3, 4), acknowledge="evaluation-only", factor=100, sigma=1,
                                z=1.5, epsilon=0.1, stale_rounds=10)
    assert spec.evaluation.attacks(4) and not spec.evaluation.attacks(0)
    assert spec_from_dict(spec.to_dict()) == spec


def test_a_job_without_an_attack_has_no_attacker() -> None:
    spec = parse_manifest(_manifest())
    assert spec.evaluation.attack is None and not any(spec.evaluation.attacks(p) for p in range(5))


BAD = {
    "not acknowledged": (_attack(acknowledge="yes"), r"spec\.evaluation\.attack: evaluation\.attack is for evaluation "
                                                     r"only: set evaluation\.attack\.acknowledge to evaluation-only"),
    "acknowledge missing": ({"kind": "scaling", "peers": [4]}, r"spec\.evaluation\.attack: required field is missing"
                                                               r".*'acknowledge'"),
    "unknown kind": (_attack(kind="flip"), r"spec\.evaluation\.attack\.kind: expected one of \['sign-flip'"),
    "peer out of range": (_attack(peers=[5]), r"evaluation\.attack\.peers must be peer indices below peers"),
    "peer listed twice": (_attack(peers=[1, 1]), r"evaluation\.attack\.peers lists a peer twice"),
    "no honest peer left": (_attack(peers=[0, 1, 2, 3, 4]), r"must leave at least one honest peer"),
    "unknown parameter": (_attack(strength=3), r"spec\.evaluation\.attack: unknown field .*strength"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_attack_is_refused_naming_the_field(case: str) -> None:
    attack, message = BAD[case]
    with pytest.raises(SpecError, match=message):
        parse_manifest(_manifest(attack))


def test_p2ptrain_validate_refuses_an_unacknowledged_attack_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_manifest({"kind": "sign-flip", "peers": [0], "acknowledge": "sure"})))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: spec.evaluation.attack: evaluation.attack is for evaluation only") and err.count("\n") == 1


@pytest.mark.parametrize("example", sorted(Path(__file__).resolve().parents[2].glob("examples/attack-*.yaml")))
def test_the_attack_examples_are_acknowledged_evaluations(example: Path) -> None:
    spec = parse_manifest(yaml.safe_load(example.read_text()))
    assert spec.evaluation.attack is not None and spec.evaluation.attack.acknowledge == "evaluation-only"
