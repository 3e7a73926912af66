"""A job with a real Byzantine peer: it holds the job's signing key (a compromised pod) and sends
every honest peer a huge, signed, well-formed gradient each round. A robust rule keeps training on
course; the plain mean, under the same attack, does not — so the attack is real.

Real parts: redis-server processes, the gradient function over HTTP, HTTP CloudEvents, torch.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
import torch

from p2ptrain import wire
from p2ptrain.peer import Peer
from p2ptrain.peer.receiver import ROUND_WINDOW

from .harness import Job, make_spec, running_job

ROUNDS = 60
ATTACKER = 4


async def _attack(job: Job, honest: list[Peer], training: asyncio.Future[object]) -> int:
    """Send each honest peer the poisoned gradient for every round it can accept, until training ends."""
    spec = job.spec
    poison = wire.encode_tensor(np.full(honest[0].numel, 50.0, dtype=np.float32))
    sent: set[tuple[int, int]] = set()
    async with httpx.AsyncClient() as http:
        while not training.done():
            for peer in honest:
                current = peer.inbox.current_round
                for round_index in range(current, min(current + ROUND_WINDOW, ROUNDS - 1) + 1):
                    if (peer.index, round_index) in sent:
                        continue
                    event = wire.build_event(
                        wire.GRADIENT_AVERAGED, wire.peer_source(spec.namespace, spec.name, ATTACKER), data=poison,
                        extensions={"round": round_index, "peer": ATTACKER}, key=job.secrets.signing_key,
                    )
                    headers, body = wire.to_http(event)
                    response = await http.post(job.config.peer_urls[peer.index] + "/", headers=headers, content=body)
                    if response.status_code == 202:
                        sent.add((peer.index, round_index))
            await asyncio.sleep(0.01)
    return len(sent)


async def _train_under_attack(rule: str) -> tuple[list[Peer], int]:
    spec = make_spec(
        name=f"byz-{rule}", peers=5, functionsPerPeer=1, batchSize=32, rounds=ROUNDS,
        optimizer={"learningRate": 0.2}, aggregation={"rule": rule, "byzantine": 1 if rule != "mean" else 0},
        exchange={"roundDeadlineSeconds": 30}, evaluation={"everyRounds": ROUNDS},
        # The attacker here only sends gradients; it runs no peer, so it would never publish a state at a
        # re-sync and every sync would wait out the deadline for it. Replicas are compared bit for bit below.
        training={"resyncEveryRounds": 0},
    )
    async with running_job(spec) as job:
        honest = [p for p in job.peers if p.index != ATTACKER]
        training = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(*(p.run() for p in honest)), 180))
        poisoned = await _attack(job, honest, training)
        reports = await training
    assert all(len(r) == ROUNDS and all(x.peers_used == 5 for x in r) for r in reports), "the attacker was not heard"
    return honest, poisoned


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
async def test_a_robust_rule_trains_through_a_byzantine_peer(rule: str) -> None:
    honest, poisoned = await _train_under_attack(rule)
    assert poisoned == len(honest) * ROUNDS
    accuracies = [p.status.accuracy for p in honest]
    assert all(a is not None and a >= 0.8 for a in accuracies), accuracies
    # Every honest peer aggregated the same five gradients: their replicas stay bit-identical.
    states = [p.final_state() for p in honest]
    for state in states[1:]:
        assert all(torch.equal(tensor, states[0][name]) for name, tensor in state.items())


async def test_the_same_attack_ruins_the_plain_mean() -> None:
    honest, poisoned = await _train_under_attack("mean")
    assert poisoned == len(honest) * ROUNDS
    accuracy = honest[0].status.accuracy
    assert accuracy is None or math.isnan(accuracy) or accuracy < 0.5, accuracy
