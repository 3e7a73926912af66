"""The operator's configuration: read once from ``P2PTRAIN_OPERATOR_*`` environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from p2ptrain import __version__
from p2ptrain.config import PEER_PORT

DEFAULT_IMAGE = f"ghcr.io/p2ptrain/p2ptrain:{__version__}"
PULL_SECRETS_ENV = "P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS"
# A Secret's name: a DNS-1123 subdomain.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_pull_secrets(value: str) -> tuple[str, ...]:
    """``regcred, other`` -> ("regcred", "other"): the chart's imagePullSecrets, for every child pod."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if len(name) > 253 or not _SECRET_NAME.fullmatch(name):
            raise ValueError(
                f"{PULL_SECRETS_ENV}: {name!r} is not a Secret name (expected comma-separated lower-case "
                "DNS-1123 names, e.g. 'regcred,mirror-creds')"
            )
    return names


@dataclass(frozen=True)
class Settings:
    image: str = DEFAULT_IMAGE
    namespace: str = ""  # empty: every namespace
    metrics_port: int = 9090
    liveness_port: int = 8080
    cluster_domain: str = "cluster.local"
    poll_seconds: float = 10.0
    # Where the operator reads a peer's progress; tests point it at local fake peers.
    peer_status_url: str = "http://{job}-peer-{index}.{job}-peers.{namespace}.svc.{domain}:" + f"{PEER_PORT}/status"
    # topology ps: where the operator reads the aggregator's progress (tests: a local fake).
    aggregator_status_url: str = (
        "http://{job}-aggregator-0.{job}-aggregator.{namespace}.svc.{domain}:" + f"{PEER_PORT}/status"
    )
    image_pull_policy: str = "IfNotPresent"
    # Secrets in each job's namespace that every child pod pulls its image with.
    image_pull_secrets: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str, default: str) -> str:
            return env.get(f"P2PTRAIN_OPERATOR_{name}") or default

        return cls(
            image=get("IMAGE", DEFAULT_IMAGE),
            namespace=get("NAMESPACE", ""),
            metrics_port=int(get("METRICS_PORT", "9090")),
            liveness_port=int(get("LIVENESS_PORT", "8080")),
            cluster_domain=get("CLUSTER_DOMAIN", "cluster.local"),
            poll_seconds=float(get("POLL_SECONDS", "10")),
            peer_status_url=get("PEER_STATUS_URL", cls.peer_status_url),
            aggregator_status_url=get("AGGREGATOR_STATUS_URL", cls.aggregator_status_url),
            image_pull_policy=get("IMAGE_PULL_POLICY", "IfNotPresent"),
            image_pull_secrets=parse_pull_secrets(get("IMAGE_PULL_SECRETS", "")),
        )
