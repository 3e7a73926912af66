"""``p2ptrain.cost``: the peer's ledger and its counters, the job totals, the price list (its checks
and its arithmetic) and ``p2ptrain cost``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import REGISTRY

from p2ptrain import cost as cost_module
from p2ptrain import wire
from p2ptrain.cost import (
    GB,
    REDIS_INFO_SECONDS,
    CostError,
    PeerCost,
    Prices,
    cost_of,
    empty_cost,
    job_cost,
    load_prices,
    memory_bytes,
    parse_prices,
    process_age_seconds,
    tensor_blob_bytes,
)
from p2ptrain.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "prices").glob("*.yaml"))
GOOD: dict[str, Any] = {
    "date": "2026-11", "source": "test", "currency": "USD",
    "function": {"perGbSecond": 0.5, "perMillionInvocations": 2.0, "perVcpuHour": 3.6},
    "pods": {"perVcpuHour": 7.2, "vcpusPerPod": 2},
    "transfer": {"perGb": 1.0},
}


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


@pytest.mark.parametrize(("resources", "expected"), [
    ({"limits": {"memory": "1Gi"}, "requests": {"memory": "1Mi"}}, 1 << 30),
    ({"requests": {"memory": "256M"}}, 256 * 10**6),
    ({"limits": {"memory": 1048576}}, 1 << 20),
    ({"limits": {"cpu": "1"}}, None),
    (None, None),
])
def test_memory_bytes_reads_kubernetes_quantities(resources: dict[str, Any] | None, expected: int | None) -> None:
    assert memory_bytes(resources) == expected


def test_a_bad_memory_quantity_names_the_field() -> None:
    with pytest.raises(CostError, match=r"function.resources.limits.memory='lots' is not a memory quantity"):
        memory_bytes({"limits": {"memory": "lots"}})


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


def test_job_cost_sums_peers_and_skips_missing_blocks() -> None:
    a, b = empty_cost(), empty_cost()
    a.update(functionInvocations=2, functionCpuSeconds=0.5, functionMemorySource="measured")
    b.update(functionInvocations=3, functionCpuSeconds=0.25, functionMemorySource="measured")
    a["peerBytes"]["outboxFetched"] = 7
    total = job_cost([a, None, b, {}])
    assert total["functionInvocations"] == 5 and total["functionCpuSeconds"] == 0.75
    assert total["peerBytes"]["outboxFetched"] == 7 and total["functionMemorySource"] == "measured"


def test_prices_turn_figures_into_money() -> None:
    prices = parse_prices(GOOD)
    cost = empty_cost()
    cost.update(functionInvocations=2_000_000, functionGbSeconds=10.0, functionCpuSeconds=3600.0,
                peerPodSeconds=1800.0, redisPodSeconds=1800.0)
    cost["peerBytes"]["exchangeSent"] = 1 << 30
    cost["redisBytes"]["meanRead"] = 1 << 30
    money = prices.price(cost)
    assert money["items"] == {
        "functionMemory": 5.0, "functionInvocations": 4.0, "functionCpu": 3.6,
        "pods": 1.0 * 2 * 7.2,  # one pod-hour in all x 2 vCPUs per pod
        "transfer": 2.0,
    }
    assert money["total"] == pytest.approx(5 + 4 + 3.6 + 14.4 + 2)
    assert money["currency"] == "USD" and money["pricesDate"] == "2026-11"


@pytest.mark.parametrize(("change", "message"), [
    ({"date": None}, r"date is required"),
    ({"currency": ""}, r"currency is required"),
    ({"function": {"perGbSecond": -1}}, r"function.perGbSecond must be a non-negative number, got -1"),
    ({"function": {"perGbSecond": "cheap"}}, r"function.perGbSecond must be a non-negative number"),
    ({"function": {"perGbSecnd": 1}}, r"unknown field function.perGbSecnd; expected perGbSecond"),
    ({"transfer": 3}, r"transfer must be a mapping of perGb"),
    ({"egress": {}}, r"unknown field 'egress'"),
    ({"function": {}, "pods": {"vcpusPerPod": 4}, "transfer": {}}, r"no price is set"),
])
def test_a_bad_price_list_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    data = {**GOOD, **change}
    with pytest.raises(CostError, match=message):
        parse_prices(data, "prices.yaml")


def test_a_price_list_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(CostError, match="expected a mapping"):
        parse_prices(["perGb", 1])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_examples_are_valid_dated_and_labelled_as_examples(path: Path) -> None:
    prices = load_prices(path)
    assert isinstance(prices, Prices) and prices.date == "2026-11"
    assert "Example only" in prices.source and "EXAMPLE" in path.read_text()


def test_both_example_price_lists_ship() -> None:
    assert [p.name for p in EXAMPLES] == ["serverless-example.yaml", "vm-example.yaml"]


def test_tensor_blob_bytes_matches_the_encoder() -> None:
    import numpy as np

    assert tensor_blob_bytes(1000) == len(wire.encode_tensor(np.zeros(1000, dtype=np.float32)))


def test_cost_of_finds_the_block_in_a_summary_or_a_job() -> None:
    block = empty_cost()
    block["functionInvocations"] = 9
    assert cost_of({"cost": block}, "s.json")["functionInvocations"] == 9
    assert cost_of({"kind": "P2PTrainingJob", "status": {"cost": block}}, "job.json")["functionInvocations"] == 9
    with pytest.raises(CostError, match="job.json: no cost block found"):
        cost_of({"status": {"phase": "Running"}}, "job.json")


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2ptrain", "cost", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_cost_command_prices_a_job_read_from_stdin(tmp_path: Path) -> None:
    block = empty_cost()
    block.update(functionInvocations=1_000_000, functionGbSeconds=2.0)
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump(GOOD))
    job = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "status": {"cost": block}}

    done = _cli("-", "--prices", str(prices), "--json", stdin=json.dumps(job))

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["functionInvocations"] == 1_000_000
    assert result["money"]["items"]["functionInvocations"] == 2.0 and result["money"]["items"]["functionMemory"] == 1.0


def test_cost_command_refuses_a_bad_price_list_with_exit_2(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"cost": empty_cost()}))
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({**GOOD, "transfer": {"perGb": -2}}))
    done = _cli(str(summary), "--prices", str(prices))
    assert done.returncode == 2
    assert "transfer.perGb must be a non-negative number, got -2" in done.stderr


def test_redis_is_asked_for_its_uptime_at_most_once_a_second_and_in_the_last_round(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO's uptime counts whole seconds: a round shorter than that skips the round trip and the
    thread hop, and the last round always asks, so the run's figures are complete."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port, password=redis_server.password)
    ledger = PeerCost(_labels("3"), {}, None)
    now = [1000.0]
    monkeypatch.setattr(cost_module.time, "monotonic", lambda: now[0])
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
