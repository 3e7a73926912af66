"""Where a job's parts live: the runtime configuration handed to every peer and gradient function.

A ``RuntimeConfig`` is the parsed job spec plus the addresses of each peer, each peer's Redis and the
gradient function. The local runner builds one from free loopback ports; the operator builds one from
the stable DNS names of its StatefulSets and Knative Service (``cluster_config``) and ships it in the
job's ConfigMap. Secrets (Redis password, event-signing key) never enter it: they come from the
environment (a Kubernetes Secret, or the local runner).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2ptrain.spec import JobSpec, spec_from_dict

PEER_PORT = 8080
REDIS_PORT = 6379

REDIS_PASSWORD_ENV = "P2PTRAIN_REDIS_PASSWORD"
SIGNING_KEY_ENV = "P2PTRAIN_SIGNING_KEY"
CONFIG_ENV = "P2PTRAIN_CONFIG"


class ConfigError(ValueError):
    """A runtime configuration that is missing or malformed."""


@dataclass(frozen=True)
class ChildNames:
    """Names of the Kubernetes objects the operator creates for a job (shared with ``cluster_config``)."""

    job: str

    @property
    def secret(self) -> str:
        return f"{self.job}-secrets"

    @property
    def configmap(self) -> str:
        return f"{self.job}-config"

    @property
    def redis(self) -> str:
        """The Redis StatefulSet and its headless Service."""
        return f"{self.job}-redis"

    @property
    def export(self) -> str:
        """The Job that writes the trained model to ``spec.output`` when the job succeeded."""
        return f"{self.job}-export"

    @property
    def peer(self) -> str:
        """The peer StatefulSet (pods ``<job>-peer-<i>``)."""
        return f"{self.job}-peer"

    @property
    def peers_service(self) -> str:
        """The peers' headless Service."""
        return f"{self.job}-peers"

    @property
    def aggregator(self) -> str:
        """``topology: ps``: the aggregator's StatefulSet (pod ``<job>-aggregator-0``) and headless Service."""
        return f"{self.job}-aggregator"

    @property
    def aggregator_redis(self) -> str:
        """``topology: ps``: the aggregator's Redis StatefulSet and its headless Service."""
        return f"{self.job}-aggregator-redis"

    @property
    def gradient(self) -> str:
        """The Knative Service of the gradient function."""
        return f"{self.job}-gradient"


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RuntimeConfig:
    spec: JobSpec
    peer_urls: tuple[str, ...]
    redis: tuple[RedisAddress, ...]
    function_url: str
    # topology: ps only: the aggregator's endpoint (peers post their gradients there) and its Redis
    # (the aggregator's model and checkpoint, which the peers read)
    aggregator_url: str | None = None
    aggregator_redis: RedisAddress | None = None

    def __post_init__(self) -> None:
        if len(self.peer_urls) != self.spec.peers or len(self.redis) != self.spec.peers:
            raise ConfigError(
                f"config lists {len(self.peer_urls)} peer URLs and {len(self.redis)} Redis addresses "
                f"for a job of {self.spec.peers} peers"
            )
        if self.spec.topology == "ps" and (self.aggregator_url is None or self.aggregator_redis is None):
            raise ConfigError("topology ps needs the aggregator's URL and Redis address in the runtime config "
                              "(aggregatorUrl, aggregatorRedis)")

    def to_json(self) -> str:
        return json.dumps(
            {
                "spec": self.spec.to_dict(),
                "peerUrls": list(self.peer_urls),
                "redis": [{"host": r.host, "port": r.port} for r in self.redis],
                "functionUrl": self.function_url,
                **({"aggregatorUrl": self.aggregator_url} if self.aggregator_url else {}),
                **({"aggregatorRedis": {"host": self.aggregator_redis.host, "port": self.aggregator_redis.port}}
                   if self.aggregator_redis else {}),
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        try:
            data: dict[str, Any] = json.loads(text)
            aggregator_redis = data.get("aggregatorRedis")
            return cls(
                spec=spec_from_dict(data["spec"]),
                peer_urls=tuple(data["peerUrls"]),
                redis=tuple(RedisAddress(r["host"], int(r["port"])) for r in data["redis"]),
                function_url=data["functionUrl"],
                aggregator_url=data.get("aggregatorUrl"),
                aggregator_redis=(RedisAddress(aggregator_redis["host"], int(aggregator_redis["port"]))
                                  if aggregator_redis is not None else None),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed runtime config: {exc!r}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> RuntimeConfig:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read runtime config {path}: {exc.strerror}") from exc


def cluster_config(spec: JobSpec, cluster_domain: str = "cluster.local") -> RuntimeConfig:
    """The addresses of a job's parts inside a cluster, from the operator's stable names."""
    names = ChildNames(spec.name)
    suffix = f"{spec.namespace}.svc.{cluster_domain}"
    return RuntimeConfig(
        spec=spec,
        peer_urls=tuple(
            f"http://{names.peer}-{i}.{names.peers_service}.{suffix}:{PEER_PORT}" for i in range(spec.peers)
        ),
        redis=tuple(RedisAddress(f"{names.redis}-{i}.{names.redis}.{suffix}", REDIS_PORT) for i in range(spec.peers)),
        function_url=f"http://{names.gradient}.{suffix}",
        **_cluster_aggregator(spec, names, suffix),
    )


def _cluster_aggregator(spec: JobSpec, names: ChildNames, suffix: str) -> dict[str, Any]:
    """``topology: ps``: the aggregator pod and its Redis, by their StatefulSets' stable names."""
    if spec.topology != "ps":
        return {}
    return {
        "aggregator_url": f"http://{names.aggregator}-0.{names.aggregator}.{suffix}:{PEER_PORT}",
        "aggregator_redis": RedisAddress(f"{names.aggregator_redis}-0.{names.aggregator_redis}.{suffix}", REDIS_PORT),
    }


@dataclass(frozen=True)
class Secrets:
    redis_password: str
    signing_key: bytes

    @classmethod
    def from_env(cls) -> Secrets:
        password = os.environ.get(REDIS_PASSWORD_ENV)
        key = os.environ.get(SIGNING_KEY_ENV)
        missing = [n for n, v in ((REDIS_PASSWORD_ENV, password), (SIGNING_KEY_ENV, key)) if not v]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        assert password is not None and key is not None
        return cls(redis_password=password, signing_key=key.encode())

    def __repr__(self) -> str:  # never log secrets
        return "Secrets(<redacted>)"


def peer_index_from_hostname(hostname: str) -> int:
    """A StatefulSet pod's ordinal: ``digits-peer-3`` → 3."""
    tail = hostname.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ConfigError(f"cannot derive the peer index from hostname {hostname!r}: pass --index")
    return int(tail)
