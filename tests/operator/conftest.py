"""Fixtures of the operator tests: fake peers and a kmock cluster; every operator started is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import kmock
import pytest

from tests.operator.harness import RESOURCES, Cluster, FakePeers


@pytest.fixture
def fake_peers() -> Iterator[FakePeers]:
    peers = FakePeers()
    yield peers
    peers.close()


@pytest.fixture
async def cluster(fake_peers: FakePeers) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        for key, info in RESOURCES.items():
            k8s.resources[key] = kmock.ResourceInfo(**info)
        k8s.objects["v1/namespaces", None, "default"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        result = Cluster(k8s, str(server.url).rstrip("/"), fake_peers)
        try:
            yield result
        finally:
            while result.operators:
                await asyncio.to_thread(result.stop_operator)
