"""Worker momentum (``spec.aggregation.momentum``): what an honest peer publishes is the momentum of
its own averaged gradients, not the gradient of the round.

El-Mhamdi, Guerraoui, Rouault, "Distributed momentum for Byzantine-resilient stochastic gradient
descent" (ICLR 2021) and Karimireddy, He, Jaggi, "Learning from history for Byzantine robust
optimization" (ICML 2021): averaging over rounds shrinks the honest vectors' spread relative to
their mean, so attacks that hide inside that spread (ALIE, IPM) have little room left, and the rule
sees honest vectors that agree. Each peer keeps ``m_t = beta * m_{t-1} + g_t`` (torch SGD's
momentum, dampening 0), the rule aggregates the ``m_t`` and the replica steps with the aggregate
without momentum of its own: with the plain mean this is exactly SGD momentum ``beta`` on the mean
gradient, so ``aggregation.momentum`` moves ``optimizer.momentum`` from after the rule to before it
(the CRD refuses both at once). The state is this peer's own and part of its checkpoint.
"""

from __future__ import annotations

import threading

import numpy as np

CHECKPOINT_KEY = "worker.momentum"  # its name among the checkpoint's extra tensors


class WorkerMomentum:
    """One peer's momentum of its own gradients, kept per round so that a round run again (after a
    Redis outage) or a checkpoint written while the next round runs sees the right state."""

    def __init__(self, beta: float) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"aggregation.momentum must be in [0, 1), got {beta}")
        self.beta = beta
        self.round: int | None = None  # the last round stepped
        self.before: np.ndarray | None = None  # the momentum before that round
        self.after: np.ndarray | None = None  # ... and after it (what was published)
        self._lock = threading.Lock()  # a checkpoint reads the state from another thread

    def step(self, round_index: int, gradient: np.ndarray) -> np.ndarray:
        """What this peer publishes in ``round_index`` for its gradient ``gradient`` (float32)."""
        with self._lock:
            base = self.before if round_index == self.round else self.after  # the same round again: redo it
        if base is not None and base.shape != gradient.shape:
            base = None  # the model changed shape: history no longer applies
        result = gradient.astype(np.float32, copy=True)  # a new array: a checkpoint may still read the old
        if base is not None:
            result += np.float32(self.beta) * base
        with self._lock:
            self.round, self.before, self.after = round_index, base, result
        return result

    def state_after(self, round_index: int) -> np.ndarray | None:
        """The momentum once round ``round_index`` is done (None: none yet, or not known any more)."""
        with self._lock:
            if self.round is None or self.round <= round_index:  # a round without a gradient leaves it as it was
                return self.after
            return self.before if self.round == round_index + 1 else None

    def restore(self, round_index: int, momentum: np.ndarray | None) -> None:
        """Continue after round ``round_index`` with ``momentum`` (from a checkpoint; None: start afresh)."""
        restored = None if momentum is None else momentum.astype(np.float32, copy=True)
        with self._lock:
            self.round, self.before, self.after = round_index, None, restored
