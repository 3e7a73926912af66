"""An in-process job for integration tests: real Redis servers, real HTTP, real torch.

Peers and the gradient function run inside the test's event loop but talk only over HTTP on
loopback ports (uvicorn servers, p2ptrain.asgi.serve), and store gradients in real ``redis-server`` processes. Nothing is
faked; running in-process just avoids paying torch's import per process in every test.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from p2ptrain import asgi
from p2ptrain.config import RedisAddress, RuntimeConfig, Secrets
from p2ptrain.function_server import FunctionFront
from p2ptrain.gradient import GradientFunction
from p2ptrain.peer import Peer
from p2ptrain.redis_server import RedisServer, free_ports
from p2ptrain.spec import JobSpec, parse_manifest
from p2ptrain.store import checkpoint_round


def make_spec(name: str = "itest", **spec: Any) -> JobSpec:
    manifest = {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": name},
        "spec": {"model": {"name": "mlp", "args": {"hidden": 32}}, "dataset": {"name": "digits"}, **spec},
    }
    return parse_manifest(manifest)


@dataclass
class Job:
    spec: JobSpec
    config: RuntimeConfig
    secrets: Secrets
    redis: list[RedisServer]
    function: GradientFunction
    peers: list[Peer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _servers: list[asyncio.Task[None]] = field(default_factory=list)

    async def train(self, timeout: float = 120) -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(p.run() for p in self.peers)), timeout)


async def wait_until(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check`` until it is true or ``timeout`` passes (the caller asserts what it needs)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def checkpointed(peer: Peer) -> int:
    """The round of the latest checkpoint in this peer's Redis (-1: none). A peer starting round n has
    not necessarily written the checkpoint after round n-1: that is done in the background."""
    reached = checkpoint_round(peer.store.client, peer.store.keys)
    return -1 if reached is None else reached


async def _serve(app: Any, port: int, stop: asyncio.Event) -> None:
    await asgi.serve(app, [f"127.0.0.1:{port}"], stop, graceful_timeout=0.5)


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.asynccontextmanager
async def running_job(spec: JobSpec, *, module: Any = None) -> AsyncIterator[Job]:
    """Start Redis servers, the gradient function and the peers' endpoints; stop them all after."""
    # The key as deployed: hex text (an environment variable and a key file hold text; the foreign client
    # strips a file's surrounding whitespace, which random bytes could begin or end with).
    job_secrets = Secrets(redis_password=secrets.token_hex(16), signing_key=secrets.token_hex(32).encode())
    servers = [RedisServer(password=job_secrets.redis_password, module=module) for _ in range(spec.peers)]
    try:
        for server in servers:
            await asyncio.to_thread(server.start)
        function_port, *peer_ports = free_ports(spec.peers + 1)  # distinct (see free_ports)
        config = RuntimeConfig(
            spec=spec,
            peer_urls=tuple(f"http://127.0.0.1:{p}" for p in peer_ports),
            redis=tuple(RedisAddress(s.host, s.port) for s in servers),
            function_url=f"http://127.0.0.1:{function_port}/",
        )
        function = GradientFunction(config, job_secrets)
        job = Job(spec, config, job_secrets, servers, function)
        # The app `p2ptrain function` serves: our bounded decoding in front of func-python's middleware,
        # which calls start() on lifespan.
        job._servers.append(asyncio.create_task(_serve(FunctionFront(function), function_port, job._stop)))
        for index, port in enumerate(peer_ports):
            peer = Peer(config, index, job_secrets)
            job.peers.append(peer)
            job._servers.append(asyncio.create_task(_serve(peer.app, port, job._stop)))
        for port in (function_port, *peer_ports):
            await _wait_port(port)
        yield job
    finally:
        if "job" in locals():
            job._stop.set()
            await asyncio.gather(*job._servers, return_exceptions=True)
        for server in servers:
            await asyncio.to_thread(server.stop)
