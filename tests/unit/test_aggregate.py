"""Aggregation rules: agreement with the mean on honest input, permutation invariance, robustness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.aggregate import RULES, AggregationError, aggregate, krum_select, minimum_gradients

ROBUST = ["median", "trimmed-mean", "krum", "multi-krum"]


def honest(n: int, d: int = 20, seed: int = 0, spread: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.ones(d) + spread * torch.randn(n, d, generator=generator)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_identical_gradients_aggregate_to_themselves(rule: str) -> None:
    grads = torch.arange(12.0).repeat(5, 1)
    torch.testing.assert_close(aggregate(rule, grads, 0 if rule == "mean" else 1), grads[0])


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_rules_are_permutation_invariant(rule: str, seed: int, data: st.DataObject) -> None:
    grads = honest(7, seed=seed)
    permutation = torch.tensor(data.draw(st.permutations(range(7))))
    f = 0 if rule == "mean" else 2
    torch.testing.assert_close(aggregate(rule, grads[permutation], f), aggregate(rule, grads, f))


@pytest.mark.parametrize("rule", ROBUST)
@pytest.mark.parametrize("attack", [1e6, -1e6], ids=["huge", "huge-negative"])
def test_robust_rules_ignore_f_outliers_where_the_mean_does_not(rule: str, attack: float) -> None:
    f = 2
    grads = honest(9)
    grads[:f] = attack  # two Byzantine peers send enormous gradients
    honest_rows = grads[f:]
    result = aggregate(rule, grads, f)
    assert torch.all(result >= honest_rows.min(dim=0).values - 1e-6)
    assert torch.all(result <= honest_rows.max(dim=0).values + 1e-6)
    assert (aggregate("mean", grads, 0) - honest_rows.mean(dim=0)).abs().max() > 1e4


def test_krum_ignores_one_outlier_and_picks_an_honest_row() -> None:
    grads = honest(6)
    grads[3] = -50.0
    chosen = krum_select(grads, f=1, m=1)
    assert chosen.item() != 3
    result = aggregate("krum", grads, 1)
    assert any(torch.equal(result, row) for row in grads[[0, 1, 2, 4, 5]])


def test_multi_krum_averages_the_m_best_rows() -> None:
    grads = honest(7)
    grads[0] = 100.0
    result = aggregate("multi-krum", grads, 1, m=3)
    chosen = krum_select(grads, 1, 3)
    assert 0 not in chosen.tolist()
    torch.testing.assert_close(result, grads[chosen].mean(dim=0))


def test_trimmed_mean_drops_f_extremes_per_coordinate() -> None:
    grads = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [100.0, -100.0], [3.0, 40.0]])
    torch.testing.assert_close(aggregate("trimmed-mean", grads, 1), torch.tensor([2.0, 20.0]))


def test_median_of_even_count_is_mean_of_middle_pair() -> None:
    grads = torch.tensor([[1.0], [2.0], [10.0], [4.0]])
    torch.testing.assert_close(aggregate("median", grads, 1), torch.tensor([3.0]))


@pytest.mark.parametrize(
    "rule,f,n,message",
    [
        ("krum", 1, 4, "krum with f=1 needs at least 5 gradients, got 4"),
        ("multi-krum", 2, 6, "needs at least 7"),
        ("median", 2, 4, "needs at least 5"),
    ],
)
def test_too_few_gradients_is_a_clear_error(rule: str, f: int, n: int, message: str) -> None:
    assert minimum_gradients(rule, f) == n + 1
    with pytest.raises(AggregationError, match=message):
        aggregate(rule, honest(n), f)


def test_bad_input_is_refused() -> None:
    with pytest.raises(AggregationError, match="unknown aggregation rule 'bulyan'; known: krum"):
        aggregate("bulyan", honest(5), 1)
    with pytest.raises(AggregationError, match=r"\[n, d\] matrix"):
        aggregate("mean", torch.ones(3), 0)
    grads = honest(5)
    grads[2, 4] = float("nan")
    with pytest.raises(AggregationError, match=r"rows \[2\] contain NaN"):
        aggregate("median", grads, 1)
    with pytest.raises(AggregationError, match="m must lie in"):
        aggregate("multi-krum", honest(5), 1, m=9)
