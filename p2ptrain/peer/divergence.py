"""Divergence: a round whose loss or gradient is not finite, or whose loss explodes.

A diverged model only gets worse, and every later round would burn the gradient functions' time (and
a NaN gradient is refused by the accumulator, which used to look like an outage). So the peer checks
each round: ``spec.training.onDivergence: fail`` stops the job naming the cause and the round;
``skipRound`` leaves the diverging gradient out of the round and trains on.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import numpy as np

from p2ptrain.aggregate import all_finite
from p2ptrain.peer.errors import PeerError
from p2ptrain.spec import TrainingSpec

# Recent losses the explosion test takes the median of.
LOSS_WINDOW = 20


class Diverged(PeerError):
    """Training diverged in ``round`` (0-based); ``cause`` is a short tag (non-finite-loss, ...)."""

    def __init__(self, cause: str, round_index: int, detail: str) -> None:
        super().__init__(f"training diverged in round {round_index + 1}: {detail} ({cause})")
        self.cause = cause
        self.round = round_index


class DivergenceGuard:
    def __init__(self, spec: TrainingSpec) -> None:
        self.spec = spec
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self._first: float | None = None

    @property
    def skips(self) -> bool:
        return self.spec.on_divergence == "skipRound"

    def check_loss(self, round_index: int, loss: float | None) -> None:
        """Raise ``Diverged`` for a non-finite or exploding loss; remember a sound one."""
        if loss is None:
            return
        if not math.isfinite(loss):
            raise Diverged("non-finite-loss", round_index, f"the loss is {loss}")
        if self._losses and self._first is not None:
            median = statistics.median(self._losses)
            # Above the untrained model's loss as well: late in training the median is tiny and one
            # hard batch is many times it without anything being wrong.
            if loss > self.spec.explosion_factor * median and loss > self._first:
                raise Diverged(
                    "exploding-loss", round_index,
                    f"the loss {loss:.6g} is over {self.spec.explosion_factor:g} x the running median "
                    f"{median:.6g} of the last {len(self._losses)} rounds (training.explosionFactor)",
                )
        if self._first is None:
            self._first = loss
        self._losses.append(loss)

    @staticmethod
    def check_gradient(round_index: int, gradient: np.ndarray, whose: str) -> None:
        if not all_finite(gradient):
            raise Diverged("non-finite-gradient", round_index, f"{whose} gradient has non-finite values")
