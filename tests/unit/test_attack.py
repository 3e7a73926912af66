"""The attacks of p2ptrain.attack (evaluation only): each sends what its paper says, from what it knows."""

from __future__ import annotations

import numpy as np
import pytest

from p2ptrain.attack import KINDS, Attacker, AttackError, alie, flip_labels, ipm, scaling, sign_flip

RNG = np.random.default_rng(0)
OWN = RNG.normal(size=50).astype(np.float32)
HONEST = (RNG.normal(size=(6, 50)) + 1.0).astype(np.float32)  # honest gradients agree on a direction


def test_sign_flip_and_scaling_transform_the_honest_gradient() -> None:
    np.testing.assert_array_equal(sign_flip(OWN), -OWN)
    np.testing.assert_allclose(scaling(OWN, -10.0), -10.0 * OWN)
    assert sign_flip(OWN).dtype == np.float32 and scaling(OWN, 3).dtype == np.float32


def test_gaussian_is_noise_of_the_given_sigma_and_ignores_the_gradient() -> None:
    sent = Attacker("gaussian", sigma=2.0, seed=1).craft(np.zeros(100_000, np.float32))
    assert sent is not None and sent.dtype == np.float32
    assert abs(float(sent.std()) - 2.0) < 0.05 and abs(float(sent.mean())) < 0.05


def test_label_flip_maps_each_class_to_its_mirror_and_refuses_labels_out_of_range() -> None:
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 9, 4]), 10), [9, 8, 0, 5])
    with pytest.raises(AttackError, match=r"\[0, 10\)"):
        flip_labels(np.array([0, 10]), 10)


def test_alie_sits_z_standard_deviations_below_the_honest_mean_per_coordinate() -> None:
    sent = alie(HONEST, z=1.5)
    expected = HONEST.astype(np.float64).mean(0) - 1.5 * HONEST.astype(np.float64).std(0)
    np.testing.assert_allclose(sent, expected, rtol=1e-5)


def test_ipm_is_minus_epsilon_times_the_honest_mean_so_its_inner_product_is_negative() -> None:
    sent = ipm(HONEST, epsilon=0.5)
    np.testing.assert_allclose(sent, -0.5 * HONEST.mean(0), rtol=1e-5)
    assert float(sent @ HONEST.mean(0)) < 0


def test_attacks_that_need_honest_gradients_say_so_and_fall_back_to_their_own() -> None:
    assert Attacker("alie").needs_honest and Attacker("ipm").needs_honest
    assert not any(Attacker(k).needs_honest for k in KINDS if k not in ("alie", "ipm"))
    # Nothing reached the attacker in time: its own gradient stands in for the honest mean.
    np.testing.assert_allclose(Attacker("ipm", epsilon=2.0).craft(OWN, None), -2.0 * OWN, rtol=1e-6)
    with pytest.raises(AttackError, match="alie needs at least 2"):
        alie(HONEST[:1], 1.0)


def test_silent_sends_nothing_and_stale_resends_the_gradient_of_stale_rounds_ago() -> None:
    assert Attacker("silent").craft(OWN) is None
    stale = Attacker("stale", stale_rounds=3)
    rounds = [np.full(4, r, np.float32) for r in range(8)]
    sent = [stale.craft(g) for g in rounds]
    assert [float(s[0]) for s in sent if s is not None] == [0, 0, 0, 0, 1, 2, 3, 4]


def test_unknown_kind_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(AttackError, match="unknown attack kind 'flip'.*sign-flip"):
        Attacker("flip")

