"""Replicas that drift apart under a partial quorum are made identical again at each sync round.

Real parts: redis-server processes (the peers publish and read each other's sync state there), HTTP
CloudEvents between peers and to the gradient function, torch. The in-process harness runs the
peers; the one injected fault (a slow peer) is a test-side wrapper around that peer's read of its
accumulator, outside production code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import REGISTRY

from p2ptrain.peer import Peer
from p2ptrain.status import ReplicaCheck
from p2ptrain.store import Keys

from .harness import make_spec, running_job


def _flat(peer: Peer) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(peer.replica.model.parameters()).detach().clone()


def slow_down(peer: Peer, seconds: float) -> None:
    """Make ``peer`` send its gradient ``seconds`` late every round (its average is read late), so the
    others close their rounds on the partial quorum without it while it still aggregates theirs."""
    take_average: Callable[[int], Any] = peer.store.take_average

    def late(round_index: int, **options: Any) -> Any:
        time.sleep(seconds)  # the injected fault itself, run in the round's worker thread
        return take_average(round_index, **options)

    peer.store.take_average = late  # type: ignore[method-assign]


def _resyncs(peer: Peer) -> float | None:
    return REGISTRY.get_sample_value("p2ptrain_resyncs_total", peer.labels)


async def test_a_slow_peer_drifts_under_a_partial_quorum_and_every_sync_makes_replicas_identical() -> None:
    spec = make_spec(
        name="resync", peers=3, functionsPerPeer=1, batchSize=32, rounds=8,
        optimizer={"learningRate": 0.5, "momentum": 0.9},
        exchange={"quorum": 2, "roundDeadlineSeconds": 10},
        training={"hashEveryRounds": 1, "resyncEveryRounds": 4},
    )
    async with running_job(spec) as job:
        slow_down(job.peers[2], 0.4)
        await job.train()
        check = ReplicaCheck(spec.peers)
        for peer in job.peers:
            check.note(peer.status.as_dict())
        drift = check.drift_rounds()
        # Between syncs the slow peer aggregates three gradients, the others two: the hashes differ ...
        assert drift and set(drift) <= {1, 2, 3, 5, 6, 7}, check.result()
        # ... and after each sync (rounds 4 and 8, the last) every replica is the same.
        for sync_round in ("4", "8"):
            assert len({p.status.params_hashes[sync_round] for p in job.peers}) == 1, sync_round
        params = [_flat(p) for p in job.peers]
        for other in params[1:]:
            assert torch.equal(params[0].view(torch.int32), other.view(torch.int32))
        for peer in job.peers:
            last = peer.status.as_dict()["lastSync"]
            assert last["round"] == 8 and last["peers"] == [0, 1, 2], last
            assert last["hashAfter"] == peer.replica.params_hash()
            assert peer.status.resyncs >= 1 and _resyncs(peer) == peer.status.resyncs
        # the slow peer's state before the sync was not the one the others had
        assert job.peers[2].status.last_sync["hashBefore"] != job.peers[0].status.last_sync["hashBefore"]


async def test_identical_replicas_are_compared_and_left_alone() -> None:
    spec = make_spec(
        name="nosync", peers=3, functionsPerPeer=1, batchSize=32, rounds=4,
        exchange={"quorum": 2, "roundDeadlineSeconds": 10},
        training={"resyncEveryRounds": 2},
    )
    async with running_job(spec) as job:
        before = [_flat(p) for p in job.peers]
        assert all(torch.equal(before[0], b) for b in before[1:])
        await job.train()
        for peer in job.peers:
            last = peer.status.last_sync
            # whatever the quorum did, the last sync ended with one hash; nothing was adopted when equal
            assert last["round"] == 4 and last["hashAfter"] == job.peers[0].status.last_sync["hashAfter"]
            assert last["adopted"] == (last["distinctHashes"] > 1)
            assert peer.status.resyncs == (_resyncs(peer) or 0)


async def test_a_peer_late_past_the_deadline_drifts_under_the_full_quorum_and_the_sync_repairs_it() -> None:
    """The full quorum does not rule drift out: a round closes at its deadline without a late peer (on a
    real node, a deleted peer pod resuming from its checkpoint), which then closes it with its own
    gradient. Before syncs ran under the full quorum too, that peer stayed apart to the end."""
    spec = make_spec(name="fullq", peers=3, functionsPerPeer=1, batchSize=32, rounds=4,
                     exchange={"roundDeadlineSeconds": 2}, training={"hashEveryRounds": 1, "resyncEveryRounds": 2})
    async with running_job(spec) as job:
        late = job.peers[2]
        take_average: Callable[[int], Any] = late.store.take_average

        def late_once(round_index: int, **options: Any) -> Any:
            if round_index == 0:
                time.sleep(4)  # the injected fault: past the others' 2 s deadline, in round 1 only
            return take_average(round_index, **options)

        late.store.take_average = late_once  # type: ignore[method-assign]
        await job.train()
        hashes = [p.status.params_hashes for p in job.peers]
    # Round 1: peers 0 and 1 closed it on the deadline without peer 2's gradient; peer 2 with it.
    assert hashes[0]["1"] == hashes[1]["1"] != hashes[2]["1"]
    # The sync after round 2 made them identical again (peer 2 was not alone in the median's input).
    for peer in job.peers:
        assert peer.status.last_sync["round"] == 4 and peer.status.resyncs >= 1, peer.status.last_sync
    assert len({h["4"] for h in hashes}) == 1
    params = [_flat(p) for p in job.peers]
    assert all(torch.equal(params[0].view(torch.int32), other.view(torch.int32)) for other in params[1:])


async def test_a_peer_that_publishes_after_the_deadline_adopts_what_the_others_agreed_on() -> None:
    spec = make_spec(name="latesync", peers=3, rounds=4, exchange={"quorum": 2, "roundDeadlineSeconds": 1},
                     training={"resyncEveryRounds": 4})
    async with running_job(spec) as job:
        with torch.no_grad():  # three different replicas
            for shift, peer in enumerate(job.peers):
                for p in peer.replica.model.parameters():
                    p.add_(torch.randn_like(p) * 0.01 * (shift + 1))
        first, second, late = job.peers
        # Peers 0 and 1 sync after round 4 while peer 2 has not published: they wait out the deadline,
        # compare each other, adopt the median of their two states and write down whom they compared.
        outcomes = await asyncio.gather(*(asyncio.to_thread(p.resync.run, 3) for p in (first, second)))
        assert [o.peers for o in outcomes] == [(0, 1), (0, 1)] and all(o.adopted for o in outcomes)
        assert first.replica.params_hash() == second.replica.params_hash()
        # Peer 2 comes later: it finds their list and adopts the same median, not one with its own state.
        outcome = await asyncio.to_thread(late.resync.run, 3)
        assert outcome.peers == (0, 1) and outcome.adopted and outcome.hash_before != outcome.hash_after
        assert late.replica.params_hash() == first.replica.params_hash()
        assert torch.equal(_flat(late).view(torch.int32), _flat(first).view(torch.int32))


async def test_a_peer_publishing_a_state_that_is_not_a_checkpoint_is_left_out_of_the_median() -> None:
    spec = make_spec(name="junksync", peers=3, rounds=4, exchange={"quorum": 2, "roundDeadlineSeconds": 5},
                     training={"resyncEveryRounds": 4})
    async with running_job(spec) as job:
        with torch.no_grad():
            for p in job.peers[1].replica.model.parameters():
                p.add_(0.01)
        liar = job.peers[2]
        liar.redis.hset(Keys(spec.name, 2).sync(3), mapping={"hash": "0" * 16, "state": b"not safetensors"})
        outcomes = await asyncio.gather(*(asyncio.to_thread(p.resync.run, 3) for p in job.peers[:2]))
        assert [o.peers for o in outcomes] == [(0, 1, 2), (0, 1, 2)] and all(o.adopted for o in outcomes)
        assert job.peers[0].replica.params_hash() == job.peers[1].replica.params_hash()
