"""Aggregation rules: agreement with the mean on honest input, permutation invariance, robustness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.aggregate import (
    RULES,
    AggregationError,
    CenteredClipping,
    aggregate,
    all_finite,
    bulyan_select,
    krum_select,
    mean_of_rows,
    minimum_gradients,
    squared_distances,
)

ROBUST = ["median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping"]


def honest(n: int, d: int = 20, seed: int = 0, spread: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.ones(d) + spread * torch.randn(n, d, generator=generator)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_identical_gradients_aggregate_to_themselves(rule: str) -> None:
    f = 0 if rule == "mean" else 1
    grads = torch.arange(12.0).repeat(max(5, minimum_gradients(rule, f)), 1)
    torch.testing.assert_close(aggregate(rule, grads, f), grads[0])


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_rules_are_permutation_invariant(rule: str, seed: int, data: st.DataObject) -> None:
    f = 0 if rule == "mean" else 2 if minimum_gradients(rule, 2) <= 7 else 1
    n = max(7, minimum_gradients(rule, f))
    grads = honest(n, seed=seed)
    permutation = torch.tensor(data.draw(st.permutations(range(n))))
    torch.testing.assert_close(aggregate(rule, grads[permutation], f), aggregate(rule, grads, f))


@pytest.mark.parametrize("rule", [r for r in ROBUST if r != "centered-clipping"])
@pytest.mark.parametrize("attack", [1e6, -1e6], ids=["huge", "huge-negative"])
def test_robust_rules_ignore_f_outliers_where_the_mean_does_not(rule: str, attack: float) -> None:
    f = 2
    grads = honest(max(9, minimum_gradients(rule, f)))
    grads[:f] = attack  # two Byzantine peers send enormous gradients
    honest_rows = grads[f:]
    result = aggregate(rule, grads, f)
    # Each rule's own guarantee is stated in test_rule_properties.py; on this input, with the outliers
    # far away, all of these land among the honest values.
    assert torch.all(result >= honest_rows.min(dim=0).values - 1e-6)
    assert torch.all(result <= honest_rows.max(dim=0).values + 1e-6)
    assert (aggregate("mean", grads, 0) - honest_rows.mean(dim=0)).abs().max() > 1e4


@pytest.mark.parametrize("attack", [1e6, -1e6], ids=["huge", "huge-negative"])
def test_centered_clipping_bounds_what_f_outliers_can_pull(attack: float) -> None:
    # With every honest gradient inside the radius of the center, each iteration moves the center
    # by (h/n)(honest mean - center) plus at most f*radius/n from the outliers, so after L steps
    # |result - honest mean| <= (f/n)^L |median - honest mean| + f*radius/(n - f), however far away
    # the outliers are.
    f, n, radius, iterations = 2, 9, 1.0, 3
    grads = honest(n)
    grads[:f] = attack
    honest_mean = grads[f:].mean(dim=0)
    start = aggregate("median", grads, f)
    result = aggregate("centered-clipping", grads, f, radius=radius, iterations=iterations)
    bound = (f / n) ** iterations * (start - honest_mean).norm() + f * radius / (n - f)
    assert (result - honest_mean).norm() <= bound + 1e-5
    assert (aggregate("mean", grads, 0) - honest_mean).norm() > 1e4


def test_centered_clipping_clips_each_deviation_to_the_radius() -> None:
    # Center median([0, 0, 0, 10]) = 0; step 1: (0 + 0 + 0 + 1) / 4 = 0.25; step 2: deviations
    # -0.25 (three times) and 9.75, clipped to 1: (-0.75 + 1) / 4 = 0.0625, so 0.3125.
    grads = torch.tensor([[0.0], [0.0], [0.0], [10.0]])
    result = aggregate("centered-clipping", grads, 1, radius=1.0, iterations=2)
    torch.testing.assert_close(result, torch.tensor([0.3125]))


def test_centered_clipping_keeps_the_previous_aggregate_as_its_center() -> None:
    grads = honest(5)
    grads[0] = 40.0
    rule = CenteredClipping(radius=0.5, iterations=1)
    first = rule(grads, 1)
    torch.testing.assert_close(first, aggregate("centered-clipping", grads, 1, radius=0.5, iterations=1))
    second = rule(grads, 1)
    torch.testing.assert_close(second, aggregate("centered-clipping", grads, 1, center=first, radius=0.5, iterations=1))
    assert not torch.allclose(first, second)  # the center moved: a stateless call would repeat itself
    assert rule.center is second
    rule.reset()
    torch.testing.assert_close(rule(grads, 1), first)


def test_bulyan_matches_the_papers_algorithm_written_plainly() -> None:
    # A loop-per-coordinate transcription of El Mhamdi et al. 2018, Algorithm 1, as an oracle.
    f = 2
    grads = honest(11, d=6, seed=3)
    grads[0] = 5.0
    grads[1] = -3.0
    result = aggregate("bulyan", grads, f)
    selected = [grads[i] for i in bulyan_select(grads, f).tolist()]
    assert len(selected) == 11 - 2 * f and not ({0, 1} & set(bulyan_select(grads, f).tolist()))
    expected = []
    for j in range(6):
        column = sorted(float(g[j]) for g in selected)
        middle = column[len(column) // 2]  # theta = 7 is odd
        nearest = sorted(column, key=lambda v: abs(v - middle))[: len(column) - 2 * f]
        expected.append(sum(nearest) / len(nearest))
    torch.testing.assert_close(result, torch.tensor(expected))


def test_bulyan_selection_is_iterated_krum_on_the_remaining_gradients() -> None:
    # One dimension, f = 1, n = 7, squared distances, worked by hand. Step 1 (4 neighbours): 2 and 3
    # tie at 10; 3 is closer to all (9428 < 9623, the outlier 100 counts). Step 2 (3 neighbours): 2
    # scores 9. Step 3 (2 neighbours): 1 and 4 tie at 10; 4 is closer to all. Steps 4 and 5 (one
    # neighbour) break the mutual-nearest ties 0/1 and 0/5 the same way: 1, then 5. The outlier stays out.
    grads = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    assert bulyan_select(grads, 1).tolist() == [3, 2, 4, 1, 5]


def test_geometric_median_satisfies_the_optimality_condition() -> None:
    # The geometric median z minimises sum |x_i - z|: the unit vectors from z to the inputs sum to 0.
    grads = honest(7, d=10, seed=5, spread=1.0)
    grads[:2] = 50.0
    z = aggregate("geometric-median", grads, 2, iterations=1000, tolerance=1e-9)
    pulls = (grads - z) / (grads - z).norm(dim=1, keepdim=True)
    assert pulls.sum(dim=0).norm() < 1e-2
    assert (z - grads[2:].mean(dim=0)).norm() < (z - grads.mean(dim=0)).norm()


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
        ("bulyan", 1, 6, "bulyan with f=1 needs at least 7 gradients, got 6"),
        ("bulyan", 2, 10, "needs at least 11"),
        ("geometric-median", 2, 4, "geometric-median with f=2 needs at least 5"),
        ("centered-clipping", 1, 2, "centered-clipping with f=1 needs at least 3"),
    ],
)
def test_too_few_gradients_is_a_clear_error(rule: str, f: int, n: int, message: str) -> None:
    assert minimum_gradients(rule, f) == n + 1
    with pytest.raises(AggregationError, match=message):
        aggregate(rule, honest(n), f)


def test_bad_input_is_refused() -> None:
    with pytest.raises(AggregationError, match="unknown aggregation rule 'zeno'; known: bulyan, centered-clipping"):
        aggregate("zeno", honest(5), 1)
    with pytest.raises(AggregationError, match=r"\[n, d\] matrix"):
        aggregate("mean", torch.ones(3), 0)
    grads = honest(5)
    grads[2, 4] = float("nan")
    with pytest.raises(AggregationError, match=r"rows \[2\] contain NaN"):
        aggregate("median", grads, 1)
    with pytest.raises(AggregationError, match="m must lie in"):
        aggregate("multi-krum", honest(5), 1, m=9)
    with pytest.raises(AggregationError, match="centered-clipping radius must be > 0, got 0"):
        aggregate("centered-clipping", honest(5), 1, radius=0)
    with pytest.raises(AggregationError, match=r"center must be a finite vector of 20 values, got shape \(3,\)"):
        aggregate("centered-clipping", honest(5), 1, center=torch.zeros(3))
    with pytest.raises(AggregationError, match="geometric-median iterations must be > 0, got 0"):
        aggregate("geometric-median", honest(5), 1, iterations=0)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_float32_in_and_out(rule: str) -> None:
    f = 0 if rule == "mean" else 1
    grads = honest(minimum_gradients(rule, f) + 1).double()
    assert aggregate(rule, grads, f).dtype == torch.float32


@pytest.mark.parametrize("as_numpy", [False, True])
def test_all_finite_is_exact_where_the_sum_shortcut_is_not(as_numpy: bool) -> None:
    def check(values: list[float]) -> bool:
        tensor = torch.tensor(values, dtype=torch.float32)
        return all_finite(tensor.numpy() if as_numpy else tensor)

    assert check([1.0, -2.0, 3.5])
    assert not check([1.0, float("nan"), 2.0])
    assert not check([1.0, float("inf"), 2.0])
    assert not check([float("inf"), float("-inf")])  # the sum is NaN, and so is the verdict
    # Finite values whose sum overflows: the shortcut fails, the element-wise check answers.
    assert check([3e38, 3e38, 3e38])


def test_mean_of_rows_is_the_mean_rule_to_the_bit_without_a_matrix() -> None:
    grads = honest(5, d=1000, spread=3.0)
    rows = [np.frombuffer(row.numpy().tobytes(), dtype=np.float32) for row in grads]  # read-only, as decoded
    assert not rows[0].flags.writeable
    result = mean_of_rows(rows)
    assert result.dtype == torch.float32
    assert torch.equal(result, aggregate("mean", grads, 0))
    assert all(np.array_equal(row, grads[i].numpy()) for i, row in enumerate(rows))  # inputs untouched


@pytest.mark.parametrize("n", [1, 2, 5])
def test_mean_of_rows_into_a_reused_buffer_is_the_same_mean_and_a_wrong_buffer_is_not_used(n: int) -> None:
    grads = honest(n, d=1000, spread=3.0, seed=n)
    rows = [row.numpy() for row in grads]
    buffer = torch.full((1000,), 7.0)
    result = mean_of_rows(rows, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()  # written where it was asked, no fresh vector
    assert torch.equal(result, aggregate("mean", grads, 0))
    again = mean_of_rows([r * 2 for r in rows], out=buffer)  # the next round overwrites it whole
    assert torch.equal(again, aggregate("mean", grads * 2, 0))
    for wrong in (torch.zeros(999), torch.zeros(1000, dtype=torch.float64), torch.zeros(2, 1000)):
        kept = wrong.clone()
        assert torch.equal(mean_of_rows(rows, out=wrong), aggregate("mean", grads, 0))
        assert torch.equal(wrong, kept)  # a buffer that does not fit is left alone


def test_mean_of_rows_refuses_non_finite_rows_by_name_and_leaves_an_overflow_to_the_caller() -> None:
    grads = honest(4).numpy().copy()
    grads[1, 3] = np.inf
    grads[3, 0] = np.nan
    with pytest.raises(AggregationError, match=r"rows \[1, 3\] contain NaN or Inf"):
        mean_of_rows(list(grads))
    with pytest.raises(AggregationError, match="equal-length vectors"):
        mean_of_rows([np.ones(3, np.float32), np.ones(4, np.float32)])
    # Every row finite, the sum not: the result says so (the round then skips it as non-finite).
    assert not all_finite(mean_of_rows([np.full(3, 3e38, np.float32)] * 4))


def _weiszfeld(x: torch.Tensor, iterations: int, smoothing: float = 1e-6) -> torch.Tensor:
    """The textbook iteration in float64 on the [n, d] points themselves: the reference."""
    z = x.double().mean(dim=0)
    for _ in range(iterations):
        w = 1.0 / (x.double() - z).norm(dim=1).clamp_min(smoothing)
        z = (w[:, None] * x.double()).sum(dim=0) / w.sum()
    return z


def _clipped(x: torch.Tensor, start: torch.Tensor, radius: float, iterations: int) -> torch.Tensor:
    c = start.double()
    for _ in range(iterations):
        deviations = x.double() - c
        scale = (radius / deviations.norm(dim=1)).clamp_max(1.0)
        c = c + (scale[:, None] * deviations).mean(dim=0)
    return c


@pytest.mark.parametrize("seed", range(6))
def test_weight_space_iterations_give_what_iterating_on_the_points_gives(seed: int) -> None:
    # geometric-median and centered-clipping iterate on the weights of a combination of the inputs,
    # reading the [n, d] points only for their distances and for the result: the same iterates as the
    # textbook iteration on the points, with far outliers, duplicates and several scales.
    generator = torch.Generator().manual_seed(seed)
    n, d = 3 + seed, 50 + 700 * seed
    x = torch.randn(n, d, generator=generator) * (0.01 + 3 * seed)
    if seed % 2:
        x[0] = 1e4  # a far outlier: the cancellation stays on the distances' scale, not the norms'
    if seed % 3 == 0:
        x[1] = x[2]
    f = (n - 1) // 2
    gm = aggregate("geometric-median", x, f, iterations=40, tolerance=0.0)
    torch.testing.assert_close(gm.double(), _weiszfeld(x, 40), rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    center = torch.randn(d, generator=generator)
    for start, radius in ((center, 0.5), (None, 2.0)):
        cc = aggregate("centered-clipping", x, f, center=start, radius=radius, iterations=3)
        expected = _clipped(x, aggregate("median", x, f) if start is None else start, radius, 3)
        torch.testing.assert_close(cc.double(), expected, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    assert cc.data_ptr() != center.data_ptr()


def test_squared_distances_with_an_extra_point_take_it_as_the_last_row() -> None:
    x = honest(4, d=300, spread=2.0)
    extra = torch.randn(300)
    together = squared_distances(x, extra=extra)
    expected = torch.cdist(torch.cat([x, extra[None]]).double(), torch.cat([x, extra[None]]).double()).square()
    torch.testing.assert_close(together, expected)
    torch.testing.assert_close(together[:4, :4], squared_distances(x))
    assert torch.equal(together.diagonal(), torch.zeros(5, dtype=torch.float64))
