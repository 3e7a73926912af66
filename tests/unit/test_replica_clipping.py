"""The peer's centered clipping keeps its center across rounds (one instance per job) and in the
checkpoint, so a restarted peer aggregates round r + 1 exactly as the peers that never stopped."""

from __future__ import annotations

import numpy as np
import torch

from p2ptrain.peer.replica import Replica
from p2ptrain.spec import parse_manifest


def _replica() -> Replica:
    spec = parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "clip"},
        "spec": {"peers": 3, "model": {"name": "mlp", "args": {"hidden": 8}}, "dataset": {"name": "digits"},
                 "aggregation": {"rule": "centered-clipping", "byzantine": 1}},
    })
    return Replica(spec)


def _round(replica: Replica, seed: int, shift: float) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: (shift + rng.standard_normal(replica.numel)).astype(np.float32) for i in range(3)}


def test_the_second_rounds_aggregate_depends_on_the_first() -> None:
    peer, fresh = _replica(), _replica()
    peer.aggregate(_round(peer, 1, shift=40.0))  # far from round 2: clipping pulls toward it
    second = _round(peer, 2, shift=0.0)
    with_history = peer.aggregate(second)
    without_history = fresh.aggregate(second)
    assert not torch.allclose(with_history, without_history, atol=1e-3)


def test_the_center_travels_in_the_checkpoint() -> None:
    peer, restarted = _replica(), _replica()
    peer.aggregate(_round(peer, 1, shift=40.0))
    restarted.load(peer.pack({"round": 0}))
    second = _round(peer, 2, shift=0.0)
    torch.testing.assert_close(restarted.aggregate(second), peer.aggregate(second), rtol=0, atol=0)
