"""The peer process: the endpoint served (``asgi.serve``) next to the training run, until training
ends (and, with ``linger``, until signalled). The exit code says how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Protocol

from p2ptrain import asgi
from p2ptrain.status import PeerState, PeerStatus

log = logging.getLogger(__name__)


class Served(Protocol):
    """A peer, or the ps aggregator (``p2ptrain.ps``): an ASGI app served while ``run`` trains."""

    @property
    def index(self) -> int: ...

    @property
    def status(self) -> PeerStatus: ...

    @property
    def app(self) -> asgi.App: ...

    async def run(self) -> Any: ...


async def serve_peer(peer: Served, *, host: str, port: int, metrics_port: int | None, linger: bool) -> int:
    """Run a peer with its HTTP endpoint until training ends (and, with ``linger``, until signalled).

    In a cluster the peer lingers so its status stays readable and a late peer can still fetch state;
    the local runner lets it exit. SIGTERM/SIGINT stop it: 0 done, 1 failed, 143 stopped.
    """
    from prometheus_client import start_http_server

    if metrics_port:
        start_http_server(metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = asyncio.create_task(
        asgi.serve(peer.app, [f"{host}:{port}"], stop, graceful_timeout=2)
    )
    training = asyncio.create_task(peer.run())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({training, stopped}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if training.done():
            exc = training.exception()
            if exc is not None:
                peer.status.state = PeerState.FAILED
                peer.status.message = str(exc)
                log.error("peer %d failed: %s", peer.index, exc, exc_info=exc)
                code = 1
            if linger:
                await stopped
        else:
            code = 143
    finally:
        for task in (training, stopped):
            task.cancel()
            # A failed run's exception was logged above; here only the tasks' ends are awaited.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stop.set()
        await server
    return code
