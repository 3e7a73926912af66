"""Prometheus file-based service discovery for a local run: who to scrape, kept current.

``p2ptrain run`` writes ``prometheus-targets.json`` in its work directory: the peers and the gradient
function instances that are up, in the ``file_sd_configs`` format. Function instances come and go with
the autoscaler, so the file is rewritten (atomically, by rename, which Prometheus's file watcher sees)
whenever the set changes. On a cluster the chart's PodMonitors do this job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from p2ptrain.autoscale import LocalFunctionService

TARGETS_FILE = "prometheus-targets.json"
# How often the set of instances is compared with the file: about one scrape interval, so a new
# instance is scraped before its first rounds' metrics are gone with it.
_REFRESH_SECONDS = 0.5


def target_groups(
    job: str, namespace: str, peer_ports: Iterable[int], function_ports: Iterable[int]
) -> list[dict[str, Any]]:
    """file_sd groups, labelled like the pods on a cluster (``job``, ``namespace``, ``component``).

    The metrics carry ``job`` and ``namespace`` themselves; the scrape config needs
    ``honor_labels: true`` so Prometheus keeps them (as the chart's PodMonitors do).
    """
    labels = {"job": job, "namespace": namespace}
    groups = [
        {"targets": [f"127.0.0.1:{port}" for port in sorted(peer_ports)], "labels": {**labels, "component": "peer"}},
        {
            "targets": [f"127.0.0.1:{port}" for port in sorted(function_ports)],
            "labels": {**labels, "component": "gradient-function"},
        },
    ]
    return [group for group in groups if group["targets"]]


def write_targets(path: Path, groups: list[dict[str, Any]]) -> None:
    """Replace ``path`` in one step, so Prometheus never reads half a file."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


class TargetsFile:
    """Keeps ``path`` equal to ``groups()`` while the run lasts; ``close`` stops it and empties the file
    (nothing is left to scrape, and Prometheus ends those series at once instead of failing scrapes)."""

    def __init__(self, path: Path, groups: Callable[[], list[dict[str, Any]]]) -> None:
        self.path = path
        self._groups = groups
        self._written: list[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        write_targets(self.path, [])

    def _refresh(self) -> None:
        groups = self._groups()
        if groups != self._written:
            write_targets(self.path, groups)
            self._written = groups

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_SECONDS)
            self._refresh()


def for_local_run(
    workdir: Path, job: str, namespace: str, peer_ports: Iterable[int], functions: LocalFunctionService | None
) -> TargetsFile:
    """The targets file of a local run: its peers, and the function instances that are serving (none
    for ``function.mode: inline``)."""
    peers = list(peer_ports)

    def groups() -> list[dict[str, Any]]:
        serving = [i.port for i in functions.instances if i.alive and i.ready.is_set()] if functions else []
        return target_groups(job, namespace, peers, serving)

    return TargetsFile(workdir / TARGETS_FILE, groups)
