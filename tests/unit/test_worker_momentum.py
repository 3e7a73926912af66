"""Worker momentum (``spec.aggregation.momentum``, p2ptrain.momentum): what a peer publishes, that it
survives a restart, catch-up and resync, that a round run again is not counted twice, and that with the
plain mean it is exactly the optimizer's SGD momentum moved to the peers. Real torch, no fakes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from p2ptrain.checkpoint import extra_tensors, median_state
from p2ptrain.momentum import CHECKPOINT_KEY, WorkerMomentum
from p2ptrain.peer.replica import Replica
from p2ptrain.spec import SpecError, parse_manifest


def _spec(aggregation: dict[str, Any], optimizer: dict[str, Any] | None = None) -> Any:
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "wm"},
        "spec": {"peers": 3, "rounds": 5, "model": {"name": "mlp", "args": {"hidden": 8}},
                 "dataset": {"name": "digits"}, "aggregation": aggregation,
                 "optimizer": {"learningRate": 0.1, **(optimizer or {})}},
    })


def _gradients(numel: int, seed: int, peers: int = 3) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(numel).astype(np.float32) for p in range(peers)}


def test_a_peer_publishes_the_momentum_of_its_gradients() -> None:
    momentum = WorkerMomentum(0.9)
    g0, g1, g2 = (np.full(4, v, dtype=np.float32) for v in (1.0, 2.0, 4.0))
    np.testing.assert_array_equal(momentum.step(0, g0), g0)
    np.testing.assert_allclose(momentum.step(1, g1), 0.9 * g0 + g1)
    np.testing.assert_allclose(momentum.step(2, g2), 0.9 * (0.9 * g0 + g1) + g2)


def test_a_round_run_again_is_counted_once() -> None:
    """After a Redis outage the peer runs the round again: its momentum must not take the gradient twice."""
    momentum = WorkerMomentum(0.5)
    momentum.step(0, np.ones(3, dtype=np.float32))
    first = momentum.step(1, np.full(3, 2.0, dtype=np.float32))
    again = momentum.step(1, np.full(3, 2.0, dtype=np.float32))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(again, 2.5)


def test_the_state_of_a_finished_round_is_kept_while_the_next_one_steps() -> None:
    """The checkpoint of round r is written in the background while round r + 1 already publishes."""
    momentum = WorkerMomentum(0.5)
    after_0 = momentum.step(0, np.ones(2, dtype=np.float32))
    after_1 = momentum.step(1, np.ones(2, dtype=np.float32))
    np.testing.assert_array_equal(momentum.state_after(0), after_0)
    np.testing.assert_array_equal(momentum.state_after(1), after_1)
    np.testing.assert_array_equal(momentum.state_after(3), after_1)  # rounds without a gradient change nothing
    assert momentum.state_after(-5) is None


def test_mean_with_worker_momentum_is_sgd_momentum_on_the_mean() -> None:
    """aggregation.momentum=beta with optimizer.momentum=0 moves torch's SGD momentum to the peers:
    with the plain mean the replicas take the same steps (float rounding aside)."""
    workers = Replica(_spec({"rule": "mean", "momentum": 0.9}))
    peers = [WorkerMomentum(0.9) for _ in range(3)]  # each peer's own, as Replica.published keeps it
    server = Replica(_spec({"rule": "mean"}, {"momentum": 0.9}))
    for round_index in range(6):
        gradients = _gradients(workers.numel, round_index)
        workers.apply(workers.aggregate({p: peers[p].step(round_index, g) for p, g in gradients.items()}))
        server.apply(server.aggregate(gradients))
    np.testing.assert_allclose(workers.parameters(), server.parameters(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(workers.parameters(), Replica(_spec({"rule": "mean"})).parameters())


def test_without_momentum_the_gradient_is_published_as_it_is() -> None:
    replica = Replica(_spec({"rule": "mean"}))
    gradient = _gradients(replica.numel, 0)[0]
    assert replica.momentum is None and replica.published(0, gradient) is gradient
    assert CHECKPOINT_KEY not in extra_tensors(replica.pack({"round": 0}))


def test_the_momentum_survives_a_restart() -> None:
    peer = Replica(_spec({"rule": "median", "byzantine": 1, "momentum": 0.9}))
    for round_index in range(3):
        peer.published(round_index, _gradients(peer.numel, round_index)[0])
    restarted = Replica(_spec({"rule": "median", "byzantine": 1, "momentum": 0.9}))
    restarted.load(peer.pack({"round": 2}))
    nxt = _gradients(peer.numel, 9)[0]
    published = restarted.published(3, nxt)
    np.testing.assert_array_equal(published, peer.published(3, nxt))
    assert not np.allclose(published, nxt)  # the history came along, not a fresh start


def test_a_checkpoint_has_the_momentum_even_before_the_first_step() -> None:
    """Every peer's checkpoint has one layout, so catch-up and resync can take the median of several."""
    fresh, stepped = (Replica(_spec({"rule": "median", "byzantine": 1, "momentum": 0.9})) for _ in range(2))
    stepped.published(0, np.ones(stepped.numel, dtype=np.float32))
    states = [fresh.pack({"round": 0}), stepped.pack({"round": 0}), stepped.pack({"round": 0})]
    merged = extra_tensors(median_state(states))[CHECKPOINT_KEY]
    torch.testing.assert_close(merged, torch.ones(stepped.numel))  # the median of 0, 1, 1
    adopter = Replica(_spec({"rule": "median", "byzantine": 1, "momentum": 0.9}))
    adopter.load(median_state(states))
    np.testing.assert_allclose(adopter.published(1, np.zeros(adopter.numel, dtype=np.float32)), 0.9)


def test_a_state_without_momentum_leaves_the_peers_own() -> None:
    """topology ps: every round a peer adopts the aggregator's state, which has no worker momentum."""
    peer = Replica(_spec({"rule": "mean", "momentum": 0.9}))
    aggregator = Replica(_spec({"rule": "mean", "momentum": 0.9}))
    aggregator.momentum = None  # as p2ptrain.ps.aggregator builds it
    published = peer.published(0, np.ones(peer.numel, dtype=np.float32))
    peer.load(aggregator.pack({"round": 0}))
    np.testing.assert_array_equal(peer.published(1, np.zeros(peer.numel, dtype=np.float32)), 0.9 * published)


def test_a_radius_reaches_centered_clipping() -> None:
    replica = Replica(_spec({"rule": "centered-clipping", "byzantine": 1, "radius": 0.25}))
    assert replica.clipping is not None and replica.clipping.radius == 0.25


@pytest.mark.parametrize(("aggregation", "optimizer", "names"), [
    ({"momentum": 0.9}, {"momentum": 0.9}, "aggregation.momentum and optimizer.momentum"),
    ({"momentum": 1}, {}, "spec.aggregation.momentum"),
    ({"momentum": -0.1}, {}, "spec.aggregation.momentum"),
    ({"radius": 0}, {}, "spec.aggregation.radius"),
])
def test_bad_settings_are_refused_naming_the_field(aggregation: dict[str, Any], optimizer: dict[str, Any],
                                                   names: str) -> None:
    with pytest.raises(SpecError, match=names):
        _spec(aggregation, optimizer)


def test_the_defaults_change_nothing() -> None:
    spec = _spec({})
    assert spec.aggregation.momentum == 0 and spec.aggregation.radius == 10
