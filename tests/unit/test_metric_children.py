"""metrics.child: the labelled series prometheus_client's ``labels`` gives, looked up once per label set."""

from __future__ import annotations

from prometheus_client import REGISTRY

from p2ptrain import metrics


def test_child_is_the_labelled_series_and_counts_into_it() -> None:
    labels = metrics.peer_labels("child-test", "ns", 3)
    first = metrics.child(metrics.COST_PEER_BYTES_TOTAL, **labels, path="exchange-sent")
    assert first is metrics.COST_PEER_BYTES_TOTAL.labels(**labels, path="exchange-sent")
    assert metrics.child(metrics.COST_PEER_BYTES_TOTAL, **labels, path="exchange-sent") is first
    before = REGISTRY.get_sample_value("p2ptrain_cost_peer_bytes_total", {**labels, "path": "exchange-sent"}) or 0.0
    first.inc(5)
    metrics.child(metrics.COST_PEER_BYTES_TOTAL, **labels, path="exchange-sent").inc(7)
    after = REGISTRY.get_sample_value("p2ptrain_cost_peer_bytes_total", {**labels, "path": "exchange-sent"})
    assert after == before + 12


def test_children_of_other_label_sets_or_metrics_are_other_series() -> None:
    a = metrics.child(metrics.ROUND, **metrics.peer_labels("child-test", "ns", 0))
    b = metrics.child(metrics.ROUND, **metrics.peer_labels("child-test", "ns", 1))
    c = metrics.child(metrics.ROUNDS_TOTAL, **metrics.peer_labels("child-test", "ns", 0))
    assert a is not b and a is not c
    a.set(4)
    b.set(9)
    assert REGISTRY.get_sample_value("p2ptrain_round", metrics.peer_labels("child-test", "ns", 0)) == 4
    assert REGISTRY.get_sample_value("p2ptrain_round", metrics.peer_labels("child-test", "ns", 1)) == 9
