"""The local run's Prometheus targets file and the per-peer exclusion streaks (pure, no servers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from p2ptrain import metrics
from p2ptrain.scrape_targets import TargetsFile, target_groups


def test_targets_are_file_sd_groups_labelled_like_the_pods() -> None:
    groups = target_groups("digits", "ml", [9002, 9001], [9100])
    assert groups == [
        {"targets": ["127.0.0.1:9001", "127.0.0.1:9002"],
         "labels": {"job": "digits", "namespace": "ml", "component": "peer"}},
        {"targets": ["127.0.0.1:9100"], "labels": {"job": "digits", "namespace": "ml", "component": "gradient-function"}},
    ]
    # No function instance running (scaled to zero): no empty group for Prometheus to warn about.
    assert [g["labels"]["component"] for g in target_groups("digits", "ml", [9001], [])] == ["peer"]


async def test_targets_file_follows_the_instances_and_is_emptied_on_close(tmp_path: Path) -> None:
    ports = [9100]
    path = tmp_path / "targets.json"
    targets = TargetsFile(path, lambda: target_groups("digits", "default", [9001], ports))

    def functions_listed() -> Any:
        return [t for g in json.loads(path.read_text()) for t in g["targets"] if g["labels"]["component"] != "peer"]

    targets.start()
    assert functions_listed() == ["127.0.0.1:9100"]
    ports.append(9101)
    deadline = asyncio.get_running_loop().time() + 10
    while functions_listed() != ["127.0.0.1:9100", "127.0.0.1:9101"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert functions_listed() == ["127.0.0.1:9100", "127.0.0.1:9101"]
    await targets.close()
    assert json.loads(path.read_text()) == []


def test_excluded_rounds_count_up_while_left_out_and_reset_when_back() -> None:
    labels = metrics.peer_labels("streaks", "default", 0)

    def streak(peer: int) -> float | None:
        return REGISTRY.get_sample_value("p2ptrain_peer_excluded_rounds", {**labels, "excluded_peer": str(peer)})

    for included in ({0, 1}, {0, 1}, {0}, {0}, {0}):
        metrics.record_excluded_rounds(labels, 3, included)
    assert (streak(0), streak(1), streak(2)) == (0, 3, 5)
    metrics.record_excluded_rounds(labels, 3, {0, 1, 2})
    assert (streak(1), streak(2)) == (0, 0)
