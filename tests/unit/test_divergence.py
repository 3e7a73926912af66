"""The divergence guard: which losses and gradients stop (or skip) a round, and which must not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2ptrain.peer.divergence import Diverged, DivergenceGuard
from p2ptrain.peer.functions import is_non_finite_answer
from p2ptrain.spec import TrainingSpec


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_diverges_naming_the_round(loss: float) -> None:
    guard = DivergenceGuard(TrainingSpec())
    guard.check_loss(0, 2.3)
    with pytest.raises(Diverged, match=r"round 2: the loss is .*non-finite-loss") as info:
        guard.check_loss(1, loss)
    assert info.value.cause == "non-finite-loss" and info.value.round == 1


def test_an_exploding_loss_diverges_over_the_running_median() -> None:
    guard = DivergenceGuard(TrainingSpec(explosion_factor=10))
    for round_index, loss in enumerate([2.3, 2.0, 1.8]):
        guard.check_loss(round_index, loss)
    guard.check_loss(3, 19.0)  # under 10 x median 2.0... (2.0, 1.8, 2.3 -> 2.0): 19 < 20
    with pytest.raises(Diverged, match=r"round 6: the loss 185412 is over 10 x the running median") as info:
        guard.check_loss(5, 185412.0)
    assert info.value.cause == "exploding-loss"


def test_a_hard_batch_late_in_training_is_not_divergence() -> None:
    """Late in training the median is tiny: a batch many times it but below the untrained loss is fine."""
    guard = DivergenceGuard(TrainingSpec(explosion_factor=10))
    guard.check_loss(0, 2.3)
    for round_index in range(1, 30):
        guard.check_loss(round_index, 0.01)
    guard.check_loss(30, 0.9)  # 90 x the median, still under the first round's 2.3


def test_a_non_finite_gradient_diverges() -> None:
    guard = DivergenceGuard(TrainingSpec())
    guard.check_gradient(0, np.ones(4, dtype=np.float32), "this peer's")
    with pytest.raises(Diverged, match="round 4: this peer's gradient has non-finite values"):
        guard.check_gradient(3, np.array([1.0, np.nan], dtype=np.float32), "this peer's")


def test_skip_round_is_the_configured_choice() -> None:
    assert not DivergenceGuard(TrainingSpec()).skips
    assert DivergenceGuard(TrainingSpec(on_divergence="skipRound")).skips


def test_the_functions_non_finite_answers_are_recognised() -> None:
    assert is_non_finite_answer(422, "non-finite", "gradient is not finite")
    # what the function answers today when its accumulator refuses a NaN gradient
    text = "gradient could not be stored in the peer's Redis: accumulating into k failed: ERR blob has non-finite values"
    assert is_non_finite_answer(503, "redis", text)
    assert not is_non_finite_answer(503, "redis", "gradient could not be stored: Connection refused")
    assert not is_non_finite_answer(503, "not-ready", "function is still starting")
