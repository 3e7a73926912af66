"""A peer that (re)starts behind the others catches up from their state instead of retraining alone.

Real parts: redis-server processes (the other peers' checkpoints are read from their own Redis),
HTTP CloudEvents between peers and to the gradient function, torch.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from p2ptrain import wire
from p2ptrain.checkpoint import pack_state
from p2ptrain.store import Keys, PeerStore

from .harness import checkpointed, make_spec, running_job, wait_until


async def test_a_late_peer_adopts_the_others_state_and_trains_in_step() -> None:
    spec = make_spec(
        name="rejoin",
        peers=3,
        functionsPerPeer=1,
        batchSize=32,
        rounds=14,
        exchange={"roundDeadlineSeconds": 1},
        evaluation={"everyRounds": 1},
    )
    async with running_job(spec) as job:
        early = [asyncio.create_task(peer.run()) for peer in job.peers[:2]]
        # Peers 0 and 1 train without peer 2 (each round waits the 1 s deadline for it).
        await wait_until(lambda: checkpointed(job.peers[0]) >= 3 or any(t.done() for t in early))
        assert checkpointed(job.peers[0]) >= 3, "peers 0 and 1 did not get going"

        late = job.peers[2]
        late_reports = await asyncio.wait_for(late.run(), 120)
        await asyncio.wait_for(asyncio.gather(*early), 120)

        caught_up = late.status.caught_up
        assert caught_up and caught_up["from"] == 0 and caught_up["to"] >= 4, caught_up
        assert late_reports[0].round == caught_up["to"], "the late peer re-ran rounds the others had done"
        assert late_reports[-1].round == spec.rounds - 1
        # It started from the others' model, not from the initial one: as good as theirs at the end.
        accuracies = [peer.status.accuracy for peer in job.peers]
        assert all(a is not None for a in accuracies)
        assert abs(accuracies[2] - accuracies[0]) <= 0.03, accuracies  # type: ignore[operator]
        distance = max(
            float((a - b).norm() / b.norm())
            for a, b in zip(late.final_state().values(), job.peers[0].final_state().values(), strict=True)
        )
        assert distance < 0.05, f"late peer's model is {distance:.3f} (relative) away from peer 0's"


async def test_a_restarting_peer_is_not_fooled_by_one_byzantine_checkpoint() -> None:
    spec = make_spec(name="rejoinbyz", peers=4, rounds=20, aggregation={"rule": "median", "byzantine": 1})
    async with running_job(spec) as job:
        restarting, *others = job.peers
        honest = others[0]
        with torch.no_grad():
            for p in honest.replica.model.parameters():
                p.add_(0.5)  # the honest peers' trained model, far from the restarting peer's initial one

        def save(peer, round_index: int, state: bytes) -> None:
            PeerStore(peer.redis, Keys(spec.name, peer.index), key_ttl_seconds=60).save_checkpoint(round_index, state, {})

        save(others[0], 7, pack_state(honest.replica.model, honest.replica.optimizer, {"round": 7}))
        save(others[1], 8, pack_state(honest.replica.model, honest.replica.optimizer, {"round": 8}))
        liar = torch.nn.utils.parameters_to_vector(honest.replica.model.parameters()).detach() + 1e6
        torch.nn.utils.vector_to_parameters(liar, others[2].replica.model.parameters())
        save(others[2], 999, pack_state(others[2].replica.model, others[2].replica.optimizer, {"round": 999}))

        start = await restarting.catch_up(0)
        assert start == 9, "the median round of the three checkpoints, 8, was not the one adopted"
        assert REGISTRY.get_sample_value("p2ptrain_catch_ups_total", restarting.labels) == 1
        for name, value in restarting.final_state().items():
            np.testing.assert_allclose(value.numpy(), honest.replica.model.state_dict()[name].numpy(), rtol=0, atol=1e-6)

        # A peer whose own checkpoint is already as new as the others' keeps its own.
        assert await restarting.catch_up(10) == 10


async def test_a_round_closes_early_when_the_missing_peers_have_moved_past_it() -> None:
    """Peers send rounds in order: one that sent round 3 will never send round 2, so a peer catching
    up on round 2 must not wait out the deadline for it (the deadline here is 60 s)."""
    spec = make_spec(name="moved", peers=3, rounds=10, exchange={"roundDeadlineSeconds": 60})
    async with running_job(spec) as job:
        peer = job.peers[0]
        gradient = np.zeros(peer.numel, dtype=np.float32)
        for round_index, sender in ((2, 0), (2, 2), (3, 2), (3, 1)):
            await peer.inbox.file(round_index, sender, gradient + sender)
        deadline = time.monotonic() + 60
        gradients = await asyncio.wait_for(peer.collect(2, deadline), timeout=10)
        assert sorted(gradients) == [0, 2]

        # Peer 1 sent round 5 too; its round 4 event never reached us, but it is in its outbox.
        for round_index, sender in ((4, 0), (4, 2), (5, 1)):
            await peer.inbox.file(round_index, sender, gradient + sender)
        PeerStore(job.peers[1].redis, Keys(spec.name, 1), key_ttl_seconds=60).put_outbox(4, wire.encode_tensor(gradient + 41))
        gradients = await asyncio.wait_for(peer.collect(4, deadline), timeout=10)
        assert sorted(gradients) == [0, 1, 2] and float(gradients[1][0]) == 41.0
        assert peer.status.recovered == 1
        assert REGISTRY.get_sample_value("p2ptrain_gradients_recovered_total", peer.labels) == 1

        # Peer 1 has not moved past round 6 yet (it sent round 5 only): round 6 waits for it.
        await peer.inbox.file(6, 0, gradient)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(peer.collect(6, deadline), timeout=0.5)


@pytest.mark.parametrize("module", [False, True], ids=["lua", "module"])
async def test_training_survives_a_peer_redis_restarting_empty(module: bool) -> None:
    """A peer's Redis pod restarts with no persistence: its model versions, accumulators, Lua library
    and checkpoint are gone. The peer waits for it, runs the round again and training goes on."""
    from p2ptrain import native

    module_path = native.module_path() if module else None
    assert not module or module_path is not None, "the Redis module could not be built"
    spec = make_spec(name="redisgone", peers=2, functionsPerPeer=2, batchSize=32, rounds=30,
                     exchange={"roundDeadlineSeconds": 20}, evaluation={"everyRounds": 5},
                     optimizer={"learningRate": 0.1, "momentum": 0.9},
                     function={"retries": 0})
    async with running_job(spec, module=module_path) as job:
        training = asyncio.ensure_future(job.train(timeout=180))
        await wait_until(lambda: job.peers[0].status.round >= 5 or training.done())
        assert job.peers[0].status.round >= 5, "training did not get going"
        await asyncio.to_thread(job.redis[0].stop)
        # until the peer notices (it needs its Redis in every round)
        await wait_until(lambda: job.peers[0].status.message.startswith("waiting for Redis") or training.done())
        assert job.peers[0].status.message.startswith("waiting for Redis"), job.peers[0].status.message
        await asyncio.to_thread(job.redis[0].start)  # same port and password, empty
        reports = await training

        assert [len(r) for r in reports] == [30, 30], "a peer did not finish every round"
        assert reports[0][-1].round == 29 and reports[1][-1].round == 29
        # The restarted Redis holds this peer's state again, from the round after the restart on.
        saved = PeerStore(job.redis[0].client(), Keys(spec.name, 0), key_ttl_seconds=60).load_checkpoint()
        assert saved is not None and saved[0] == 29
        assert min(p.status.accuracy or 0 for p in job.peers) >= 0.8
