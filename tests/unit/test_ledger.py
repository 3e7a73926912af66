"""``p2ptrain.ledger``: the peer's ledger (its cost block and its counters), the pod-seconds it
takes from the process and from its Redis, and the bytes of a tensor blob."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from p2ptrain import ledger as ledger_module
from p2ptrain import wire
from p2ptrain.cost import GB, memory_bytes
from p2ptrain.ledger import REDIS_INFO_SECONDS, PeerCost, process_age_seconds, tensor_blob_bytes
from p2ptrain.redis_server import RedisServer


def _labels(peer: str) -> dict[str, str]:
    return {"job": "cost-unit", "namespace": "test", "peer": peer}


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_ledger_sums_replies_and_feeds_its_counters() -> None:
    labels = _labels("0")
    figures: dict[str, Any] = {}
    ledger = PeerCost(labels, figures, spec_memory_bytes=None)
    for _ in range(3):
        ledger.invoked()
    ledger.computed({"cpuSeconds": 0.25, "wallSeconds": 0.5, "memoryBytes": GB, "modelReadBytes": 100,
                     "accumulatorWriteBytes": 40}, cold=True)
    ledger.computed({"cpuSeconds": 0.25, "wallSeconds": 1.5, "memoryBytes": 2 * GB, "accumulatorWriteBytes": 40},
                    cold=False)
    ledger.peer_bytes("exchangeSent", 1000)

    assert figures["functionInvocations"] == 3 and figures["functionColdStarts"] == 1
    assert figures["functionCpuSeconds"] == 0.5 and figures["functionWallSeconds"] == 2.0
    assert figures["functionGbSeconds"] == 0.5 * 1 + 1.5 * 2  # memory x wall of each invocation
    assert figures["functionMemorySource"] == "measured"
    assert figures["redisBytes"]["modelRead"] == 100 and figures["redisBytes"]["accumulatorWritten"] == 80
    assert _sample("p2ptrain_cost_function_invocations_total", **labels) == 3
    assert _sample("p2ptrain_cost_function_memory_byte_seconds_total", **labels) == 3.5 * GB
    assert _sample("p2ptrain_cost_redis_bytes_total", **labels, path="accumulator-written") == 80
    assert _sample("p2ptrain_cost_peer_bytes_total", **labels, path="exchange-sent") == 1000


def test_memory_from_the_spec_wins_over_the_measured_rss() -> None:
    figures: dict[str, Any] = {}
    ledger = PeerCost(_labels("1"), figures, spec_memory_bytes=memory_bytes({"limits": {"memory": "512Mi"}}))
    ledger.computed({"wallSeconds": 2.0, "memoryBytes": 10 * GB}, cold=False)
    assert figures["functionGbSeconds"] == 1.0 and figures["functionMemorySource"] == "spec"


def test_pod_seconds_follow_the_redis_uptime_across_a_redis_restart() -> None:
    figures: dict[str, Any] = {}
    ledger = PeerCost(_labels("2"), figures, None)
    ledger.tick(100)  # this Redis had been up 100 s when the peer first looked
    ledger.tick(130)
    ledger.tick(5)  # it restarted: 5 s of the new one
    assert figures["redisPodSeconds"] == 135
    # The peer's pod-seconds start with its process, not with the ledger (torch and data load first).
    age = process_age_seconds()
    assert age is not None and age > 0.5
    assert abs(figures["peerPodSeconds"] - age) < 0.5


def test_tensor_blob_bytes_matches_the_encoder() -> None:
    assert tensor_blob_bytes(1000) == len(wire.encode_tensor(np.zeros(1000, dtype=np.float32)))


def test_redis_is_asked_for_its_uptime_at_most_once_a_second_and_in_the_last_round(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO's uptime counts whole seconds: a round shorter than that skips the round trip and the
    thread hop, and the last round always asks, so the run's figures are complete."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port, password=redis_server.password)
    ledger = PeerCost(_labels("3"), {}, None)
    now = [1000.0]
    monkeypatch.setattr(ledger_module.time, "monotonic", lambda: now[0])
    try:
        assert ledger.redis_due()  # never asked
        ledger.tick_redis(client)
        now[0] += REDIS_INFO_SECONDS / 2
        assert not ledger.redis_due()
        assert ledger.redis_due(last=True)
        now[0] += REDIS_INFO_SECONDS / 2
        assert ledger.redis_due()
    finally:
        client.close()


def test_a_rounds_info_runs_behind_the_next_round_and_the_last_round_waits_for_it(redis_server: RedisServer) -> None:
    """A slow INFO (here: a real Redis paused with CLIENT PAUSE) must not hold up the round that asks;
    the run's last round waits for the one in flight and its own, so the figures are complete."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port, password=redis_server.password)
    pauser = redis.Redis(host=redis_server.host, port=redis_server.port, password=redis_server.password)
    ledger = PeerCost(_labels("4"), {}, None)

    async def rounds() -> tuple[float, float]:
        started = time.monotonic()
        await ledger.tick_after_round(client, last=False)  # never asked: asks, in the background
        first = time.monotonic() - started
        await ledger.tick_after_round(client, last=True)
        return first, time.monotonic() - started

    try:
        pauser.execute_command("CLIENT", "PAUSE", 800, "ALL")
        first, last = asyncio.run(rounds())
        assert first < 0.4, f"the round waited {first:.2f} s for INFO"
        assert last >= 0.7, f"the last round returned after {last:.2f} s, before Redis answered"
        assert not ledger.redis_due()  # it asked, just now
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        client.close()
        pauser.close()
