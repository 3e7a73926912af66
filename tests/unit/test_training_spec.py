"""``spec.training``: its defaults come from the CRD, bad values are refused naming the field, and it
survives the trip to child processes (``to_dict`` / ``spec_from_dict``)."""

from __future__ import annotations

from typing import Any

import pytest

from p2ptrain.spec import SpecError, TrainingSpec, parse_manifest, spec_from_dict


def _manifest(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "t"},
            "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, **spec}}


def test_defaults_fail_on_divergence() -> None:
    assert parse_manifest(_manifest()).training == TrainingSpec(on_divergence="fail", explosion_factor=10,
                                                                hash_every_rounds=1)


@pytest.mark.parametrize(
    ("training", "field"),
    [({"onDivergence": "ignore"}, "onDivergence"), ({"explosionFactor": 0.5}, "explosionFactor"),
     ({"hashEveryRounds": 0}, "hashEveryRounds"), ({"onDivergance": "fail"}, "onDivergance")],
)
def test_bad_values_are_refused_naming_the_field(training: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_manifest(_manifest(training=training))


def test_the_training_spec_reaches_child_processes() -> None:
    spec = parse_manifest(_manifest(training={"onDivergence": "skipRound", "explosionFactor": 50}))
    again = spec_from_dict(spec.to_dict())
    assert again.training == TrainingSpec(on_divergence="skipRound", explosion_factor=50, hash_every_rounds=1)
