"""``spec.training``: its defaults come from the CRD, bad values are refused naming the field, and it
survives the trip to child processes (``to_dict`` / ``spec_from_dict``)."""

from __future__ import annotations

from typing import Any

import pytest

from p2ptrain.spec import SpecError, TrainingSpec, parse_manifest, spec_from_dict
from p2ptrain.store import OUTBOX_ROUNDS


def _manifest(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "t"},
            "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, **spec}}


def test_defaults_fail_on_divergence_and_checkpoint_every_4_rounds() -> None:
    assert parse_manifest(_manifest()).training == TrainingSpec(on_divergence="fail", explosion_factor=10,
                                                                hash_every_rounds=1, checkpoint_every_rounds=4)


@pytest.mark.parametrize(
    ("training", "field"),
    [({"onDivergence": "ignore"}, "onDivergence"), ({"explosionFactor": 0.5}, "explosionFactor"),
     ({"hashEveryRounds": 0}, "hashEveryRounds"), ({"onDivergance": "fail"}, "onDivergance"),
     ({"checkpointEveryRounds": 0}, "checkpointEveryRounds"), ({"checkpointEveryRounds": 5}, "checkpointEveryRounds")],
)
def test_bad_values_are_refused_naming_the_field(training: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_manifest(_manifest(training=training))


def test_the_training_spec_reaches_child_processes() -> None:
    spec = parse_manifest(_manifest(training={"onDivergence": "skipRound", "explosionFactor": 50}))
    again = spec_from_dict(spec.to_dict())
    assert again.training == TrainingSpec(on_divergence="skipRound", explosion_factor=50, hash_every_rounds=1)


def test_the_rounds_between_checkpoints_fit_in_half_the_outbox() -> None:
    """A restarted peer re-runs the rounds since its checkpoint from the other peers' outboxes: the most
    the CRD allows leaves the other half of the outbox for the rounds it is down."""
    spec = parse_manifest(_manifest(training={"checkpointEveryRounds": OUTBOX_ROUNDS // 2}))
    assert spec.training.checkpoint_every_rounds == OUTBOX_ROUNDS // 2
    with pytest.raises(SpecError, match="checkpointEveryRounds"):
        parse_manifest(_manifest(training={"checkpointEveryRounds": OUTBOX_ROUNDS // 2 + 1}))
    again = spec_from_dict(spec.to_dict())
    assert again.training.checkpoint_every_rounds == OUTBOX_ROUNDS // 2
