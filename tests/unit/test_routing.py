"""``autoscale.pick``: the local front door routes as Knative's activator does, by containerConcurrency."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from p2ptrain.autoscale import pick


def instances(*inflight: int) -> list[Any]:
    return [SimpleNamespace(name=f"i{n}", inflight=busy) for n, busy in enumerate(inflight)]


def name(instance: Any) -> str:
    return str(instance.name)


def test_low_concurrency_takes_the_first_instance_with_a_free_slot() -> None:
    ready = instances(1, 0, 0)
    chosen, _ = pick(2, ready, 2, 0)
    assert chosen is ready[0]  # busy but not full: not the idle ones after it
    ready = instances(2, 2, 1)
    assert pick(3, ready, 2, 0)[0] is ready[2]
    assert pick(1, instances(1, 1), 1, 0)[0] is None


def test_high_concurrency_goes_round_robin_over_free_instances() -> None:
    ready = instances(0, 0, 5)
    order = []
    index = 0
    for _ in range(4):
        chosen, index = pick(5, ready, 5, index)
        order.append(name(chosen))
    assert order == ["i0", "i1", "i0", "i1"]  # i2 is full and skipped
    assert pick(5, instances(5, 5), 5, 1)[0] is None


def test_unlimited_concurrency_takes_the_less_busy_of_two() -> None:
    ready = instances(3, 1)
    for _ in range(20):
        assert pick(0, ready, 1_000_000, 0)[0] is ready[1]
    seen = {name(pick(0, instances(0, 0, 0), 1_000_000, 0)[0]) for _ in range(200)}
    assert len(seen) == 3  # drawn at random: every instance gets requests
