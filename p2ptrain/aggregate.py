"""Byzantine-robust aggregation rules: plain functions with one signature, registered by name.

Every rule is ``rule(grads: Tensor[n, d], f: int, **params) -> Tensor[d]`` where ``n`` gradients
arrived this round and up to ``f`` of them may be arbitrary (Byzantine). Adding a rule is adding a
function, its minimum ``n`` and a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class AggregationError(ValueError):
    """The gradients cannot be aggregated with this rule (too few, wrong shape, not finite)."""


class Rule(Protocol):
    def __call__(self, grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor: ...


RULES: dict[str, Rule] = {}
MINIMUM: dict[str, Callable[[int], int]] = {}


def register(name: str, minimum: Callable[[int], int]) -> Callable[[Rule], Rule]:
    def decorate(rule: Rule) -> Rule:
        RULES[name] = rule
        MINIMUM[name] = minimum
        return rule

    return decorate


def minimum_gradients(rule: str, f: int) -> int:
    """How many gradients ``rule`` needs to tolerate ``f`` Byzantine ones."""
    _known(rule)
    return MINIMUM[rule](f)


def aggregate(rule: str, grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor:
    """Validate ``grads`` and apply the named rule."""
    _known(rule)
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise AggregationError(f"gradients must be a non-empty [n, d] matrix, got shape {tuple(grads.shape)}")
    if f < 0:
        raise AggregationError(f"f must be >= 0, got {f}")
    if not torch.isfinite(grads).all():
        bad = (~torch.isfinite(grads)).any(dim=1).nonzero().flatten().tolist()
        raise AggregationError(f"gradient rows {bad} contain NaN or Inf")
    n = grads.shape[0]
    needed = MINIMUM[rule](f)
    if n < needed:
        raise AggregationError(f"{rule} with f={f} needs at least {needed} gradients, got {n}")
    return RULES[rule](grads.float(), f, **params)


def _known(rule: str) -> None:
    if rule not in RULES:
        raise AggregationError(f"unknown aggregation rule {rule!r}; known: {', '.join(sorted(RULES))}")


@register("mean", minimum=lambda f: 1)
def mean(grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor:
    """The plain average: optimal with honest peers, broken by a single Byzantine one."""
    return grads.mean(dim=0)


@register("median", minimum=lambda f: 2 * f + 1)
def median(grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for even n."""
    n = grads.shape[0]
    ordered = grads.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@register("trimmed-mean", minimum=lambda f: 2 * f + 1)
def trimmed_mean(grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor:
    """Coordinate-wise mean after dropping the f largest and f smallest values (Yin et al. 2018)."""
    n = grads.shape[0]
    ordered = grads.sort(dim=0).values
    return ordered[f : n - f].mean(dim=0)


def krum_scores(grads: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each gradient: sum of squared distances to its n - f - 2 nearest others."""
    n = grads.shape[0]
    neighbours = n - f - 2
    if neighbours < 1:
        raise AggregationError(f"krum with f={f} needs n > 2f+2 = {2 * f + 2} gradients, got {n}")
    distances = torch.cdist(grads.double(), grads.double()).square()
    distances.fill_diagonal_(float("inf"))
    return distances.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def krum_select(grads: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Indices of the m gradients with the lowest Krum scores (ties broken by index)."""
    scores = krum_scores(grads, f)
    return torch.argsort(scores, stable=True)[:m]


@register("krum", minimum=lambda f: 2 * f + 3)
def krum(grads: torch.Tensor, f: int, **params: Any) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the gradient closest to its n - f - 2 neighbours."""
    return grads[krum_select(grads, f)[0]].clone()


@register("multi-krum", minimum=lambda f: 2 * f + 3)
def multi_krum(grads: torch.Tensor, f: int, m: int | None = None, **params: Any) -> torch.Tensor:
    """Multi-Krum: the average of the m gradients with the best Krum scores (default m = n - f)."""
    n = grads.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise AggregationError(f"multi-krum m must lie in [1, {n}], got {m}")
    return grads[krum_select(grads, f, m)].mean(dim=0)
