"""Replicas stay bitwise identical for every exchange dtype, and the cross-peer hash check sees drift.

Real redis-server processes, real HTTP CloudEvents and real torch (the in-process harness).
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from p2ptrain.status import ReplicaCheck

from .harness import make_spec, running_job


def _flat(peer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.nn.utils.parameters_to_vector(peer.replica.model.parameters()).detach().clone()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_sixteen_bit_exchange_keeps_four_replicas_bitwise_identical(dtype: str) -> None:
    # momentum and a large step make any difference in what each peer applies grow, not fade
    spec = make_spec(
        name=f"same-{dtype}", peers=4, functionsPerPeer=1, batchSize=32, rounds=12,
        optimizer={"learningRate": 0.5, "momentum": 0.9}, exchange={"dtype": dtype},
        training={"hashEveryRounds": 3},
    )
    async with running_job(spec) as job:
        await job.train()
        params = [_flat(p) for p in job.peers]
        for other in params[1:]:
            assert torch.equal(params[0].view(torch.int32), other.view(torch.int32)), (
                f"max |w_i - w_0| = {float((other - params[0]).abs().max())}"
            )
        check = ReplicaCheck(spec.peers)
        for peer in job.peers:
            status = peer.status.as_dict()
            assert set(status["paramsHashes"]) == {"3", "6", "9", "12"}  # every 3 rounds, and the last
            check.note(status)
        assert check.result() == {"rounds_compared": 4, "identical": True, "drift_rounds": []}
        assert job.peers[0].status.params_hashes["12"] == job.peers[0].replica.params_hash()
        for peer in job.peers:  # the same check from Prometheus: equal hash gauges after the same round
            labels = {"job": spec.name, "namespace": spec.namespace, "peer": str(peer.index)}
            assert REGISTRY.get_sample_value("p2ptrain_params_hash_round", labels) == 12
            assert REGISTRY.get_sample_value("p2ptrain_params_hash", labels) == int(
                job.peers[0].status.params_hashes["12"][:12], 16
            )


async def test_a_perturbed_replica_is_flagged_as_drift() -> None:
    # The detector alone: re-syncs (on by default, whatever the quorum) would repair the drift after the
    # last round (test_resync.py shows that).
    spec = make_spec(name="drift", peers=3, functionsPerPeer=1, batchSize=32, rounds=4, training={"resyncEveryRounds": 0})
    async with running_job(spec) as job:
        with torch.no_grad():
            next(job.peers[2].replica.model.parameters()).view(-1)[0] += 1e-6  # one parameter, slightly
        await job.train()
        check = ReplicaCheck(spec.peers)
        for peer in job.peers:
            check.note(peer.status.as_dict())
        assert check.result() == {"rounds_compared": 4, "identical": False, "drift_rounds": [1, 2, 3, 4]}
        hashes = job.peers[0].status.params_hashes
        assert hashes == job.peers[1].status.params_hashes != job.peers[2].status.params_hashes
