"""Fixtures of the node tier: the cluster tier's control plane with one real node (tests/node/node.py:
containerd, runc, kubelet, kube-proxy, CoreDNS), the project's image imported from its archive (as
``kind load image-archive`` does), and the chart installed by ``helm install`` with that image, so the
operator runs as the chart's pod. Everything is started once for the tier and stopped after it.

The image archive is ``build/p2ptrain-image.tar`` from ``make image`` (``P2PTRAIN_IMAGE_ARCHIVE``
names another); ``make e2e`` builds it first. Without it, or without the node's packages, the tier
fails and says what is missing: it does not skip."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.conftest import RELEASE, RELEASE_NAMESPACE, RESTRICTED
from tests.cluster.controlplane import ROOT, ControlPlane
from tests.node.node import NODE_ADDRESS, Node, missing_prerequisites

IMAGE_ARCHIVE = Path(os.environ.get("P2PTRAIN_IMAGE_ARCHIVE", ROOT / "build" / "p2ptrain-image.tar"))
IMAGE = os.environ.get("IMAGE", "kind.local/p2ptrain:dev")
_names = itertools.count()


@dataclass
class NodeCluster:
    plane: ControlPlane
    node: Node


@pytest.fixture(scope="package")
def node_cluster() -> Iterator[NodeCluster]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the node tier needs: " + "; ".join(missing) + " (`make e2e` installs and builds them)")
    if not IMAGE_ARCHIVE.is_file():
        pytest.fail(f"{IMAGE_ARCHIVE} is missing: `make image` builds it (`make e2e` does)")
    Node.make_bridge()
    plane = ControlPlane(address=NODE_ADDRESS)
    node = Node(plane)
    try:
        plane.start()
        node.start(images=[IMAGE_ARCHIVE])
        assert IMAGE in node.images(), f"{IMAGE_ARCHIVE} does not hold {IMAGE}: {node.images()}"
        yield NodeCluster(plane, node)
    finally:
        node.stop()
        plane.stop()


@pytest.fixture(scope="package")
def release(node_cluster: NodeCluster) -> NodeCluster:
    """The chart installed as users install it, with the image loaded on the node; `helm install
    --wait` returns once the operator's pod is ready (its probes answered on the node)."""
    plane = node_cluster.plane
    plane.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": RELEASE_NAMESPACE, "labels": RESTRICTED}})
    repository, tag = IMAGE.rsplit(":", 1)
    plane.helm("install", RELEASE, str(ROOT / "charts" / "p2ptrain"), "-n", RELEASE_NAMESPACE,
               "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
               "--set", "operator.pollSeconds=2", "--wait", "--timeout=5m", timeout=400)
    return node_cluster


@pytest.fixture
def namespace(release: NodeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace enforcing the restricted Pod Security Standard, deleted after the test."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    with release.plane.namespace(f"{stem}-{next(_names)}", RESTRICTED) as name:
        yield name
