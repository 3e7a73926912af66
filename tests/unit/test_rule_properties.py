"""Property tests (hypothesis) for every aggregation rule: what each one guarantees, under attack.

Honest gradients are drawn around a random point; up to f Byzantine ones are arbitrary (huge values
of either sign, scaled honest gradients, noise) and sit in random rows. Each rule is held to the
bound it actually guarantees, and the plain mean is shown to break where the others hold.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.aggregate import RULES, aggregate, minimum_gradients

EXAMPLES = settings(max_examples=30, deadline=None)
ROBUST = sorted(set(RULES) - {"mean"})


@st.composite
def attacked(draw: st.DrawFn, rule: str, far: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gradients, honest mask, f): n >= the rule's minimum, f Byzantine rows in random positions.

    ``far``: every Byzantine row is about 1e6 from the honest ones (the regime where distance-based
    selection, Krum's, can tell them apart); otherwise they may be anywhere, honest-looking included.
    """
    magnitude = 1e6 if far else 1e5
    f = draw(st.integers(1, 2))
    n = draw(st.integers(minimum_gradients(rule, f), minimum_gradients(rule, f) + 3))
    d = draw(st.integers(1, 12))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    centre = torch.randn(d, generator=generator) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    spread = draw(st.sampled_from([0.01, 0.1, 1.0]))
    grads = centre + spread * torch.randn(n, d, generator=generator)
    byzantine = draw(st.lists(st.integers(0, n - 1), min_size=f, max_size=f, unique=True))
    # Far attackers collude on one direction (opposite huge rows would cancel in the mean too).
    shared_sign = draw(st.sampled_from([1.0, -1.0]))
    for row in byzantine:
        kinds = ["huge", "scaled", "noise"] if far else ["huge", "scaled", "noise", "near"]
        kind = draw(st.sampled_from(kinds))
        sign = shared_sign if far else draw(st.sampled_from([1.0, -1.0]))
        if kind == "huge":
            grads[row] = sign * draw(st.sampled_from([magnitude / 10, magnitude]))
        elif kind == "scaled":
            # an honest deviation blown up, folded into the attack's half-space
            deviation = (grads[row] - centre).abs()
            grads[row] = centre + sign * magnitude * deviation / deviation.norm().clamp_min(1e-12)
        elif kind == "noise":
            noise = torch.randn(d, generator=generator)
            # far: random sizes, but at least the magnitude and on the shared side (two noise rows of
            # opposite signs cancelled in the mean: +1e6 and -0.99e6 in one dimension)
            grads[row] = centre + (sign * magnitude * (1 + noise.abs()) if far else magnitude * noise)
        else:  # just outside the honest cloud, where trimming rules must still hold
            grads[row] = centre + sign * 3 * spread
    honest = torch.ones(n, dtype=torch.bool)
    honest[byzantine] = False
    return grads, honest, f


def _box(grads: torch.Tensor, honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = grads[honest]
    return rows.min(dim=0).values, rows.max(dim=0).values


def _inside(result: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> bool:
    slack = 1e-5 * (1 + torch.maximum(low.abs(), high.abs()))
    return bool(torch.all(result >= low - slack) and torch.all(result <= high + slack))


@pytest.mark.parametrize("rule", sorted(RULES))
@EXAMPLES
@given(data=st.data())
def test_identical_inputs_aggregate_to_the_mean(rule: str, data: st.DataObject) -> None:
    f = 0 if rule == "mean" else data.draw(st.integers(0, 2))
    n = data.draw(st.integers(max(1, minimum_gradients(rule, f)), minimum_gradients(rule, f) + 4))
    row = torch.tensor(data.draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=10)))
    grads = row.repeat(n, 1)
    torch.testing.assert_close(aggregate(rule, grads, f), grads.mean(dim=0))


@pytest.mark.parametrize("rule", sorted(RULES))
@EXAMPLES
@given(data=st.data())
def test_permuting_the_gradients_does_not_change_the_result(rule: str, data: st.DataObject) -> None:
    if rule == "mean":
        grads, f = torch.randn(5, 8, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))), 0
    else:
        grads, _, f = data.draw(attacked(rule))
    permutation = torch.tensor(data.draw(st.permutations(range(grads.shape[0]))))
    expected = aggregate(rule, grads, f)
    scale = float(grads.abs().max())
    torch.testing.assert_close(aggregate(rule, grads[permutation], f), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
@EXAMPLES
@given(data=st.data())
def test_coordinate_wise_rules_stay_inside_the_honest_coordinate_range(rule: str, data: st.DataObject) -> None:
    # With n >= 2f + 1, every kept order statistic has an honest value at or below and at or above it.
    grads, honest, f = data.draw(attacked(rule))
    assert _inside(aggregate(rule, grads, f), *_box(grads, honest))


@EXAMPLES
@given(data=st.data())
def test_bulyan_stays_within_the_honest_range_widened_by_its_width(data: st.DataObject) -> None:
    # The median of Bulyan's n - 2f selected values lies among honest values, and each of the n - 4f
    # values it averages is no farther from that median than the farthest honest one: per coordinate
    # the result lies in [2*low - high, 2*high - low] of the honest values (not always in [low, high]).
    grads, honest, f = data.draw(attacked("bulyan"))
    low, high = _box(grads, honest)
    assert _inside(aggregate("bulyan", grads, f), 2 * low - high, 2 * high - low)


@pytest.mark.parametrize("rule", ["krum", "multi-krum", "bulyan"])
@EXAMPLES
@given(data=st.data())
def test_selection_rules_drop_far_outliers(rule: str, data: st.DataObject) -> None:
    grads, honest, f = data.draw(attacked(rule, far=True))
    assert _inside(aggregate(rule, grads, f), *_box(grads, honest))


@EXAMPLES
@given(data=st.data())
def test_geometric_median_is_a_convex_combination_and_near_the_honest_mean(data: st.DataObject) -> None:
    grads, honest, f = data.draw(attacked("geometric-median"))
    result = aggregate("geometric-median", grads, f)
    # Inside the convex hull of all inputs (checked through its coordinate-wise bounding box).
    assert _inside(result, grads.min(dim=0).values, grads.max(dim=0).values)
    # Breakdown point 1/2: with h honest points within r of their mean z, any y with
    # sum|y - x_i| <= sum|z - x_i| has |y - z| <= 2hr / (h - f), however far the f others are.
    z = grads[honest].mean(dim=0)
    r = float((grads[honest] - z).norm(dim=1).max())
    h = int(honest.sum())
    assert float((result - z).norm()) <= 2 * h * r / (h - f) * 1.01 + 1e-4


@EXAMPLES
@given(data=st.data())
def test_centered_clipping_moves_at_most_radius_per_iteration_from_the_median(data: st.DataObject) -> None:
    grads, _, f = data.draw(attacked("centered-clipping"))
    radius = data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    iterations = data.draw(st.integers(1, 4))
    result = aggregate("centered-clipping", grads, f, radius=radius, iterations=iterations)
    start = aggregate("median", grads, f)
    assert float((result - start).norm()) <= iterations * radius * (1 + 1e-4) + 1e-4 * float(start.norm())


@pytest.mark.parametrize("rule", ROBUST)
@EXAMPLES
@given(data=st.data())
def test_huge_outliers_move_the_mean_but_not_the_robust_rules(rule: str, data: st.DataObject) -> None:
    grads, honest, f = data.draw(attacked(rule, far=True))
    z = grads[honest].mean(dim=0)
    r = float((grads[honest] - z).norm(dim=1).max())
    result = aggregate(rule, grads, f)
    # What each rule guarantees here, loosened to one figure: coordinate-wise rules and Krum's honest
    # picks stay in the honest box (each coordinate within 2r of z), Bulyan in the box widened by its
    # width (6r), the geometric median within 2hr/(h - f) <= 6r for f <= 2; centered clipping starts
    # at the median and moves at most radius (10) per iteration (3). The mean moves ~1e6 / n.
    allowance = 6 * r * math.sqrt(grads.shape[1]) + (3 * 10.0 if rule == "centered-clipping" else 0.0)
    assert float((result - z).norm()) <= allowance
    assert float((aggregate("mean", grads, 0) - z).norm()) > 100 * allowance
