"""Inline gradients (``function.mode: inline``): the peer computes its own micro-batches in-process —
the traditional P2P baseline, with no gradient function, no activator and no Knative Service.

``InlineGradients`` offers the round what ``FunctionClient`` offers (``publish``, ``fan_out``,
``average``) and does what a function does for each micro-batch, with the function's own code:
``models.GradientModel`` (in a worker thread, or on the event loop while a round's micro-batches
take under 3 ms of CPU: ``asgi.OnLoopWhileQuick``), each micro-batch's mean gradient weighted by its
sample count, as a function's ``P2P.ACCUM`` weighs it. The sum stays in the peer's memory: nothing but
this peer adds to it, so the Redis accumulator (there for concurrent function instances and retried
calls) would only cost round trips (four a round, ``bench/round.py``). A round re-run after a Redis
outage computes its sum afresh, so no micro-batch is counted twice. A non-finite gradient is refused
before it is summed and handled as the function path handles the accumulator's refusal: ``Diverged``,
or with ``training.onDivergence: skipRound`` the micro-batch is left out and counted.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from p2ptrain import asgi
from p2ptrain.aggregate import all_finite
from p2ptrain.data import Dataset, split_micro_batches
from p2ptrain.models import GradientModel
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.divergence import Diverged
from p2ptrain.peer.functions import Receipt, left_out_non_finite
from p2ptrain.peer.replica import Replica
from p2ptrain.store import PeerStore

log = logging.getLogger(__name__)


class InlineGradients(PeerPart):
    """A peer's own gradient computation, in the shape of ``FunctionClient`` for ``Peer.run_round``."""

    def __init__(self, ctx: PeerContext, store: PeerStore, replica: Replica) -> None:
        super().__init__(ctx)
        self.store = store
        self.dataset: Dataset = replica.dataset
        # The replica's own model is read meanwhile (GET /model, evaluation): the micro-batches are
        # computed on a copy of their own.
        self._computer = GradientModel(replica.model)
        self._off_loop = asgi.OnLoopWhileQuick()  # a small model's micro-batches cost less than the hop
        self._params: tuple[int, torch.Tensor] | None = None
        self._average: tuple[int, tuple[np.ndarray, float, int] | None] | None = None  # (round, its mean)

    async def publish(self, round_index: int, params: np.ndarray, encoded: memoryview | None = None) -> str:
        """Keep the round's parameters in memory: no function reads a model version from Redis here
        (``encoded`` is the function path's)."""
        self._params = (round_index, torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32)))
        return self.store.keys.model(round_index)

    async def fan_out(
        self, round_index: int, model_key: str, indices: np.ndarray, deadline: float, *, skip_non_finite: bool = False
    ) -> list[Receipt]:
        """Every micro-batch's gradient, summed here for ``average``; their receipts.

        ``model_key`` and ``deadline`` are the function path's: nothing is fetched and nothing waited for
        here, so every micro-batch is computed. A non-finite gradient raises ``Diverged`` once all are
        done, or with ``skip_non_finite`` is left out (counted).
        """
        if self._params is None or self._params[0] != round_index:
            raise RuntimeError(f"fan_out of round {round_index + 1} before its parameters were published")
        parts = split_micro_batches(indices, self.spec.functions_per_peer)
        receipts, non_finite, average = await self._off_loop(self._compute, round_index, self._params[1], parts)
        self._average = (round_index, average)
        if non_finite and not skip_non_finite:
            raise Diverged("non-finite-gradient", round_index, non_finite[0])
        if non_finite:
            left_out_non_finite(self.ctx, round_index, non_finite)
        return receipts

    async def average(self, round_index: int, park: bool = False) -> tuple[np.ndarray, float, int] | None:
        """(weighted mean, total weight, micro-batches summed) of the round's finite gradients, or None.
        Never parked (``park`` is for the Redis accumulator): the sender parks it."""
        held, self._average = self._average, None
        return held[1] if held is not None and held[0] == round_index else None

    def _compute(
        self, round_index: int, params: torch.Tensor, parts: list[np.ndarray]
    ) -> tuple[list[Receipt], list[str], tuple[np.ndarray, float, int] | None]:
        """(receipts, non-finite micro-batches described, the weighted mean) — blocking: in a worker thread."""
        receipts: list[Receipt] = []
        non_finite: list[str] = []
        total: torch.Tensor | None = None
        weight = 0.0
        x, y = self.dataset.x_train, self.dataset.y_train
        for n, part in enumerate(parts):
            loss, _, gradient = self._computer.gradient(params, x[part], y[part], copy=False)  # summed at once
            if not all_finite(gradient):
                non_finite.append(f"the gradient of micro-batch {round_index}:{n} has non-finite values")
                continue
            # The function's weighting: each micro-batch's mean gradient counts by its sample count.
            samples = float(part.size)
            total = gradient * samples if total is None else total.add_(gradient, alpha=samples)
            weight += samples
            receipts.append(Receipt(samples=int(part.size), loss=loss, cold=False))
        average = None if total is None else (total.div_(weight).numpy(), weight, len(receipts))
        return receipts, non_finite, average
