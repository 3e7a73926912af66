"""Byzantine attacks, FOR EVALUATION ONLY: what an attacking peer sends instead of its honest gradient.

Pure, vectorised numpy over flat float32 gradients, shared by the peer (``p2ptrain.peer.attacker``)
and the robustness benchmark (``bench/robustness.py``), so both measure the very same attacks. An
``Attacker`` holds the little state an attack needs across rounds (the stale attack's history, the
noise generator); everything else is a plain function of the gradients.
"""

from __future__ import annotations

from collections import deque

import numpy as np

KINDS = ("sign-flip", "scaling", "gaussian", "label-flip", "alie", "ipm", "silent", "stale")
# The attacks that need the honest gradients of the round (the omniscient, colluding attacker).
NEEDS_HONEST = frozenset({"alie", "ipm"})


class AttackError(ValueError):
    """An attack that cannot be crafted from what it was given."""


def sign_flip(gradient: np.ndarray) -> np.ndarray:
    """The honest gradient reversed: descent becomes ascent at the same magnitude."""
    return np.negative(gradient, dtype=np.float32)


def scaling(gradient: np.ndarray, factor: float) -> np.ndarray:
    """The honest gradient times ``factor`` (a negative factor is a scaled sign flip)."""
    return np.multiply(gradient, np.float32(factor), dtype=np.float32)


def gaussian(numel: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Pure noise, N(0, sigma^2) per coordinate: a broken or random peer."""
    return rng.normal(0.0, sigma, numel).astype(np.float32)


def flip_labels(labels: np.ndarray, classes: int) -> np.ndarray:
    """Data poisoning by label flipping: class ``y`` becomes ``classes - 1 - y`` (Fang et al. 2020)."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise AttackError(f"labels must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    return (classes - 1 - labels).astype(labels.dtype, copy=False)


def _honest_matrix(honest: np.ndarray, attack: str, minimum: int) -> np.ndarray:
    if honest.ndim != 2 or honest.shape[0] < minimum:
        raise AttackError(
            f"{attack} needs at least {minimum} honest gradients as an [n, d] matrix, got shape {honest.shape}"
        )
    return honest.astype(np.float64, copy=False)


def alie(honest: np.ndarray, z: float) -> np.ndarray:
    """A little is enough (Baruch et al. 2019): per coordinate, ``z`` standard deviations below the
    honest mean — inside the spread that median- and distance-based rules accept, yet biased every round."""
    matrix = _honest_matrix(honest, "alie", 2)
    return (matrix.mean(axis=0) - z * matrix.std(axis=0)).astype(np.float32)


def ipm(honest: np.ndarray, epsilon: float) -> np.ndarray:
    """Inner-product manipulation (Xie et al. 2019): ``-epsilon`` times the honest mean, so the
    aggregate's inner product with the true gradient turns small or negative."""
    matrix = _honest_matrix(honest, "ipm", 1)
    return (-epsilon * matrix.mean(axis=0)).astype(np.float32)


class Attacker:
    """One attacking peer's attack; ``craft`` returns what it sends this round (None: nothing).

    ``own`` is the attacker's honest gradient of the round (for label-flip: the gradient of its
    minibatch with flipped labels, computed by the caller); ``honest`` the honest peers' gradients of
    the round that reached the attacker, as an [n, d] matrix (needed by ``NEEDS_HONEST`` only).
    """

    def __init__(
        self, kind: str, *, factor: float = 100.0, sigma: float = 1.0, z: float = 1.0, epsilon: float = 1.0,
        stale_rounds: int = 10, seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise AttackError(f"unknown attack kind {kind!r}; known: {', '.join(KINDS)}")
        if stale_rounds < 1:
            raise AttackError(f"stale_rounds must be >= 1, got {stale_rounds}")
        self.kind = kind
        self.factor, self.sigma, self.z, self.epsilon = factor, sigma, z, epsilon
        self.stale_rounds = stale_rounds
        self.rng = np.random.default_rng(seed)
        # Our honest gradients of this round and the stale_rounds before it, oldest first.
        self._history: deque[np.ndarray] = deque(maxlen=stale_rounds + 1)

    @property
    def needs_honest(self) -> bool:
        return self.kind in NEEDS_HONEST

    def craft(self, own: np.ndarray, honest: np.ndarray | None = None) -> np.ndarray | None:
        kind = self.kind
        if kind == "stale":
            # Round r - stale_rounds's gradient; before that many rounds have passed, round 0's.
            self._history.append(own)
            return self._history[0]
        if kind == "silent":
            return None
        if kind == "sign-flip":
            return sign_flip(own)
        if kind == "scaling":
            return scaling(own, self.factor)
        if kind == "gaussian":
            return gaussian(own.size, self.sigma, self.rng)
        if kind == "label-flip":
            return np.asarray(own, dtype=np.float32)
        if honest is None or len(honest) == 0:
            # No honest gradient reached us in time: the best guess of the honest mean is our own.
            honest = own[None, :]
        if kind == "alie":
            if len(honest) < 2:  # a spread needs two: add our own honest gradient, as Baruch et al. do
                honest = np.vstack([honest, own[None, :]])
            return alie(honest, self.z)
        return ipm(honest, self.epsilon)
