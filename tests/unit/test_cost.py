"""``p2ptrain.cost``: the cost block, the job totals, the price list (its checks and its arithmetic)
and ``p2ptrain cost``. The peer's ledger is tested in test_ledger.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2ptrain.cost import (
    CostError,
    Prices,
    cost_of,
    empty_cost,
    job_cost,
    load_prices,
    memory_bytes,
    parse_prices,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "prices").glob("*.yaml"))
GOOD: dict[str, Any] = {
    "date": "2026-11", "source": "test", "currency": "USD",
    "function": {"perGbSecond": 0.5, "perMillionInvocations": 2.0, "perVcpuHour": 3.6},
    "pods": {"perVcpuHour": 7.2, "vcpusPerPod": 2},
    "transfer": {"perGb": 1.0},
}


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
