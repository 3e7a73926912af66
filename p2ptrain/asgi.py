"""The small ASGI toolkit the peer endpoint, the gradient function and the local front door share:
lifespan, a body reader with a size limit, plain and JSON responses, and one hypercorn configuration."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

REASON_HEADER = b"x-p2ptrain-reason"


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol: nothing to set up or tear down."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Receive, limit: int, scope: Scope | None = None) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length over the limit is refused before a byte is read; otherwise chunks are
    collected (joined once, never concatenated in a loop) until the limit is crossed. Nothing more is
    read then: the caller answers 413 at once and the server drops the rest with the connection.
    """
    if scope is not None:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return None
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def headers_of(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    reason: str | None = None,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    out = headers if headers is not None else [(b"content-type", content_type)]
    out = [*out, (b"content-length", str(len(body)).encode())]
    if reason:
        out.append((REASON_HEADER, reason.encode()))
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, payload: Any) -> None:
    await respond(send, status, json.dumps(payload).encode(), content_type=b"application/json")


def hypercorn_config(bind: list[str], *, graceful_timeout: float, errorlog: logging.Logger | None) -> Any:
    """Hypercorn's settings for every server p2ptrain runs: no access log, errors through our formatter."""
    import hypercorn.config

    config = hypercorn.config.Config()
    config.bind = bind
    config.accesslog = None
    config.errorlog = errorlog
    config.graceful_timeout = graceful_timeout
    return config


async def serve(
    app: App,
    bind: list[str],
    stop: asyncio.Event,
    *,
    graceful_timeout: float = 2.0,
    errorlog: logging.Logger | None = None,
) -> None:
    """Serve ``app`` until ``stop`` is set."""
    import hypercorn.asyncio

    config = hypercorn_config(bind, graceful_timeout=graceful_timeout, errorlog=errorlog)
    await hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def quiet_cancellation(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A server connection cancelled by an interrupt is the expected end, not an error.

    Python 3.11's ``asyncio.streams`` calls ``task.exception()`` on the server's connection task in a
    done-callback, which raises CancelledError when the task was cancelled, and the loop logs that with
    a traceback; everything else goes to the default handler.
    """
    if isinstance(context.get("exception"), asyncio.CancelledError):
        log.debug("connection cancelled during shutdown: %s", context.get("message"))
        return
    loop.default_exception_handler(context)
