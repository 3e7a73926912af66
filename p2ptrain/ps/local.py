"""``p2ptrain run``'s parts for ``topology: ps`` (the aggregator's command line, its part of the
summary) and the ones both topologies share since the aggregator runs beside the peers: a child
process of the run (a peer or the aggregator) and the export of the trained model."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain.config import RedisAddress
from p2ptrain.peer.ps_round import aggregator_keys
from p2ptrain.redis_server import RedisServer, die_with_parent
from p2ptrain.spec import JobSpec
from p2ptrain.status import StatusDict
from p2ptrain.store import Keys, export_model

LOG_NAME = "aggregator.log"


@dataclass
class PeerProcess:
    index: int
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]  # what started it, to restart it
    status: StatusDict | None = None
    role: str = "peer"  # or "aggregator" (topology ps)

    env: dict[str, str] = field(default_factory=dict, repr=False)  # it holds the secrets

    @classmethod
    def start(cls, index: int, port: int, command: list[str], log_path: Path, env: dict[str, str],
              role: str = "peer") -> PeerProcess:
        """Start a peer, or the aggregator, logging to ``log_path``."""
        return cls(index, port, _spawn(command, log_path, env), log_path, command, role=role, env=env)

    def restart(self) -> None:
        self.process = _spawn(self.command, self.log_path, self.env)

    @property
    def name(self) -> str:
        return "the aggregator" if self.role == "aggregator" else f"peer {self.index}"


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )


def aggregator_addresses(spec: JobSpec, servers: list[RedisServer], port: int) -> dict[str, Any]:
    """The runtime config's aggregator fields: with ``topology: ps``, the last Redis server is its."""
    if spec.topology != "ps":
        return {}
    return {"aggregator_url": f"http://127.0.0.1:{port}", "aggregator_redis": RedisAddress(servers[-1].host, servers[-1].port)}


def aggregator_command(config_path: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "p2ptrain", "--log-level", "INFO", "aggregator", "--config", str(config_path),
            "--port", str(port), "--listen", "127.0.0.1"]


def aggregator_summary(aggregator: PeerProcess | None, restarts: int) -> dict[str, Any]:
    """The summary's ``aggregator`` (topology ps): what it reported last; its accuracy is that of the
    model every peer adopted."""
    if aggregator is None:
        return {}
    status = aggregator.status
    return {"aggregator": {
        "restarts": restarts,
        "rounds": status["round"] if status else 0,
        "accuracy": status["accuracy"] if status else None,
        "excluded_peers": status.get("excluded", {}) if status else {},
        "skipped_updates": status.get("skippedUpdates", {}) if status else {},
        "recovered_gradients": status.get("recovered", 0) if status else 0,
        "rejected_events": status.get("rejected", {}) if status else {},
    }}


def write_model(server: RedisServer, spec: JobSpec, output: Path) -> Path:
    """The final model from its checkpoint in ``server`` as safetensors: peer 0's, or with ``topology: ps``
    the aggregator's (the one every peer adopted last). Raises ``CheckpointError``."""
    keys = aggregator_keys(spec.name, spec.peers) if spec.topology == "ps" else Keys(spec.name, 0)
    with contextlib.closing(server.client()) as client:
        export_model(client, keys, output, {"p2ptrain.job": json.dumps(spec.to_dict())})
    return output
