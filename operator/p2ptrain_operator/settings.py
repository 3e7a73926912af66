"""The operator's configuration: read once from ``P2PTRAIN_OPERATOR_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/p2ptrain/p2ptrain:0.1.0"


@dataclass(frozen=True)
class Settings:
    image: str = DEFAULT_IMAGE
    namespace: str = ""  # empty: every namespace
    metrics_port: int = 9090
    liveness_port: int = 8080
    cluster_domain: str = "cluster.local"
    poll_seconds: float = 10.0
    # Where the operator reads a peer's progress; tests point it at local fake peers.
    peer_status_url: str = "http://{job}-peer-{index}.{job}-peers.{namespace}.svc.{domain}:8080/status"
    image_pull_policy: str = "IfNotPresent"

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
            image_pull_policy=get("IMAGE_PULL_POLICY", "IfNotPresent"),
        )
