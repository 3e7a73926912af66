"""``asgi.serve`` stopping while a request still runs (a call waiting for a cold start when Ctrl-C
comes): the request gets 503 with its reason, and nothing is logged as an error or a traceback. Real
uvicorn on loopback, real HTTP (aiohttp)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from p2ptrain import asgi
from p2ptrain.redis_server import free_port


async def test_a_request_cut_by_the_shutdown_gets_503_and_no_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    entered = asyncio.Event()

    async def waits_forever(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        entered.set()
        await asyncio.Event().wait()

    port, stop = free_port(), asyncio.Event()
    caplog.set_level(logging.INFO)
    server = asyncio.create_task(asgi.serve(waits_forever, [f"127.0.0.1:{port}"], stop, graceful_timeout=0.2))
    async with aiohttp.ClientSession() as session:
        for _ in range(200):  # until the server listens
            try:
                request = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/"))
                await asyncio.wait_for(entered.wait(), 0.05)
                break
            except (TimeoutError, aiohttp.ClientError):
                request.cancel()
        assert entered.is_set(), "the server never took the request"
        stop.set()
        response = await asyncio.wait_for(request, 10)
        assert response.status == 503
        assert response.headers[asgi.REASON_HEADER.decode()] == "shutting-down"
    await asyncio.wait_for(server, 10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not any(r.exc_info for r in caplog.records)
