"""An evaluation job with an attacker injected through ``spec.evaluation.attack`` (evaluation only), on the
real path: 5 peers, one of which sends -10 times its honest gradient (a scaled sign flip) through its
own sender, signed and well-formed. The plain mean is ruined; median and Krum train on; the attacker
says it attacks (status and metric), the honest peers do not.

Real parts: redis-server processes, the gradient function over HTTP, HTTP CloudEvents, torch.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from p2ptrain.peer import Peer
from p2ptrain.peer.divergence import Diverged
from p2ptrain.spec import JobSpec

from .harness import make_spec, running_job

ROUNDS = 80
ATTACKER = 4


def _spec(rule: str, **attack: object) -> JobSpec:
    return make_spec(
        name=f"attack-{rule}", peers=5, functionsPerPeer=1, batchSize=32, rounds=ROUNDS,
        optimizer={"learningRate": 0.1, "momentum": 0.9},
        aggregation={"rule": rule, "byzantine": 0 if rule == "mean" else 1},
        # Short: under the mean, peers that diverge stop sending and the others wait this long for them.
        exchange={"roundDeadlineSeconds": 10},
        evaluation={"everyRounds": ROUNDS, "attack": {"acknowledge": "evaluation-only", "kind": "scaling",
                                                      "peers": [ATTACKER], **attack}},
    )


def _honest_accuracies(peers: list[Peer]) -> list[float | None]:
    return [p.status.accuracy for p in peers if p.index != ATTACKER]


async def test_a_scaled_sign_flip_attacker_ruins_the_plain_mean() -> None:
    async with running_job(_spec("mean", factor=-10)) as job:
        outcomes = await asyncio.wait_for(asyncio.gather(*(p.run() for p in job.peers), return_exceptions=True), 240)
    # Gradient ascent: each honest peer either stops on its exploding loss (training.onDivergence=fail)
    # or ends near chance; none learns.
    for peer, outcome in zip(job.peers, outcomes, strict=True):
        if peer.index == ATTACKER:
            continue
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, Diverged), outcome
        else:
            assert peer.status.accuracy is not None and peer.status.accuracy < 0.5, peer.status.accuracy


@pytest.mark.parametrize("rule", ["median", "krum"])
async def test_median_and_krum_train_through_the_same_attacker(rule: str) -> None:
    async with running_job(_spec(rule, factor=-10)) as job:
        reports = await job.train(timeout=240)
    # Every peer heard every other one: the attack was delivered, not dropped.
    assert all(len(r) == ROUNDS and all(x.peers_used == 5 for x in r) for r in reports)
    peers = job.peers
    accuracies = _honest_accuracies(peers)
    assert all(a is not None and a >= 0.9 for a in accuracies), accuracies
    # The attacker says so, in /status and in its metric; no honest peer does.
    assert [p.status.as_dict()["attack"] for p in peers] == ["", "", "", "", "scaling"]
    labels = {"job": f"attack-{rule}", "namespace": "default", "peer": str(ATTACKER), "kind": "scaling"}
    assert REGISTRY.get_sample_value("p2ptrain_peer_attacking", labels) == 1.0
