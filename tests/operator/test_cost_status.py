"""The real kopf operator against kmock (the Kubernetes API emulator: no API server runs here) and a
real HTTP stand-in for the peers' ``/status``: the job's ``status.cost`` is the sum of its peers' cost
blocks (under ``topology: ps`` the aggregator's too), and a poll in which a peer or the aggregator does
not answer leaves the last complete sum in place."""

from __future__ import annotations

import asyncio
from typing import Any

from p2ptrain.cost import empty_cost
from p2ptrain.schema import openapi_schema
from tests.operator.harness import AGGREGATOR, Cluster, eventually, job_manifest, phase


def _peer_cost(invocations: int, cpu: float, sent: int, published: int) -> dict[str, Any]:
    block = empty_cost()
    block.update(functionInvocations=invocations, functionCpuSeconds=cpu, functionWallSeconds=2 * cpu,
                 functionGbSeconds=cpu / 4, functionMemorySource="measured", functionColdStarts=1,
                 peerPodSeconds=30.0, redisPodSeconds=31.0)
    block["peerBytes"]["exchangeSent"] = sent
    block["redisBytes"]["modelPublished"] = published
    return block


def _cost(cluster: Cluster) -> dict[str, Any] | None:
    result: dict[str, Any] | None = ((cluster.job() or {}).get("status") or {}).get("cost")
    return result


async def test_status_cost_sums_the_peers_cost_blocks(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("training", round=3)
    cluster.peers.reports[("digits", 0)]["cost"] = _peer_cost(12, 1.5, 4000, 900)
    cluster.peers.reports[("digits", 1)]["cost"] = _peer_cost(14, 2.5, 6000, 1100)

    cost = await eventually(lambda: (c := _cost(cluster)) and c["functionInvocations"] == 26 and c)

    assert cost["functionCpuSeconds"] == 4.0 and cost["functionWallSeconds"] == 8.0
    assert cost["functionGbSeconds"] == 1.0 and cost["functionColdStarts"] == 2
    assert cost["peerPodSeconds"] == 60.0 and cost["redisPodSeconds"] == 62.0
    assert cost["peerBytes"]["exchangeSent"] == 10000 and cost["redisBytes"]["modelPublished"] == 2000
    assert cost["functionMemorySource"] == "measured"
    # Every key the operator writes is declared in the CRD's status schema (nothing is pruned silently).
    declared = openapi_schema()["properties"]["status"]["properties"]["cost"]["properties"]
    assert set(cost) == set(declared)
    assert set(cost["peerBytes"]) == set(declared["peerBytes"]["properties"])
    assert set(cost["redisBytes"]) == set(declared["redisBytes"]["properties"])


async def test_a_peer_that_does_not_answer_leaves_the_last_complete_sum(cluster: Cluster) -> None:
    await cluster.apply(job_manifest())
    await asyncio.to_thread(cluster.start_operator)
    cluster.peers.report("training", round=3)
    cluster.peers.reports[("digits", 0)]["cost"] = _peer_cost(10, 1.0, 100, 10)
    cluster.peers.reports[("digits", 1)]["cost"] = _peer_cost(10, 1.0, 100, 10)
    await eventually(lambda: (c := _cost(cluster)) and c["functionInvocations"] == 20)

    del cluster.peers.reports[("digits", 1)]  # peer 1 stops answering (503)
    cluster.peers.reports[("digits", 0)]["cost"] = _peer_cost(11, 1.0, 100, 10)
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 2)  # several complete timer ticks

    assert _cost(cluster)["functionInvocations"] == 20  # type: ignore[index]


async def test_a_ps_job_sums_the_aggregators_ledger_with_the_peers(cluster: Cluster) -> None:
    await cluster.apply(job_manifest(topology="ps"))
    await asyncio.to_thread(cluster.start_operator)
    await eventually(lambda: phase(cluster) == "Created")
    cluster.peers.report("training", round=3)
    cluster.peers.reports[("digits", 0)]["cost"] = _peer_cost(12, 1.5, 4000, 900)
    cluster.peers.reports[("digits", 1)]["cost"] = _peer_cost(14, 2.5, 6000, 1100)
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 3)  # peers and aggregator, several ticks
    assert _cost(cluster) is None  # the aggregator has not answered: no poll was complete

    ledger = empty_cost() | {"peerPodSeconds": 29.0, "redisPodSeconds": 30.0}  # its pod and its own Redis
    ledger["peerBytes"] = ledger["peerBytes"] | {"exchangeReceived": 10000}  # the peers' averages it took in
    ledger["redisBytes"] = ledger["redisBytes"] | {"modelPublished": 500, "checkpointRead": 0}
    cluster.peers.reports[("digits", AGGREGATOR)] = {"peer": 2, "state": "training", "round": 3, "rounds": 10,
                                                      "cost": ledger}

    cost = await eventually(lambda: (c := _cost(cluster)) and c["peerPodSeconds"] == 89.0 and c)

    assert cost["redisPodSeconds"] == 92.0 and cost["functionInvocations"] == 26  # the aggregator calls none
    assert cost["peerBytes"]["exchangeReceived"] == 10000 and cost["peerBytes"]["exchangeSent"] == 10000
    assert cost["redisBytes"]["modelPublished"] == 2500

    del cluster.peers.reports[("digits", AGGREGATOR)]  # the aggregator stops answering (503)
    cluster.peers.reports[("digits", 0)]["cost"] = _peer_cost(20, 1.5, 4000, 900)
    polls = cluster.peers.polls
    await eventually(lambda: cluster.peers.polls >= polls + 3 * 3)
    assert _cost(cluster)["functionInvocations"] == 26  # type: ignore[index]
