"""The small ASGI toolkit the peer endpoint, the gradient function and the local front door share:
lifespan, a body reader with a size limit, plain and JSON responses, and one server (uvicorn with the
httptools parser: 40-50% less time per request than hypercorn here, see docs/bench-call.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, MutableMapping
from typing import Any, TypeVar

import uvloop

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

REASON_HEADER = b"x-p2ptrain-reason"
KEEP_ALIVE_SECONDS = 75


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


# Work on a body up to this size runs on the event loop; larger, in a worker thread. Checking and
# decoding digits' 19 KB gradient event takes 0.08 ms on the loop and 0.22 ms through two thread hops
# (docs/bench-call.md); 128 KiB keeps the loop busy well under a millisecond, so probes still answer.
ON_LOOP_MAX_BYTES = 128 * 1024
# Arithmetic that streams its input once at memory speed (the mean of the round's gradients, an SGD
# step), sized by the bytes it reads: 32 MiB is ~2 ms here. On a busy machine the two thread hops cost
# more: 1.13M parameters, 4 peers on 2 cores, aggregate + update 7.5-7.8 ms on the loop against
# 9.3-11.4 ms through a worker thread (alternated runs).
STREAM_ON_LOOP_MAX_BYTES = 32 * 1024 * 1024


async def off_loop_if_large(size: int, work: Callable[..., T], *args: Any, limit: int = ON_LOOP_MAX_BYTES) -> T:
    """``work(*args)``: here for a small ``size`` (bytes of input, up to ``limit``), in a worker thread
    for a large one."""
    if size <= limit:
        return work(*args)
    return await asyncio.to_thread(work, *args)


class OnLoopWhileQuick:
    """Runs one kind of work (a peer's own micro-batch gradients) on the event loop while its last run
    took at most ``limit_seconds`` of CPU, and in a worker thread otherwise, and the first time. Its
    size says little in advance (a convolution costs more per parameter than a linear layer); its last
    run says a lot, as the same work comes back every round. CPU, not wall time: a run preempted on a
    busy machine still counts as quick."""

    def __init__(self, limit_seconds: float = 0.003) -> None:
        self.limit_seconds = limit_seconds
        self.last_seconds: float | None = None

    async def __call__(self, work: Callable[..., T], *args: Any) -> T:
        if self.last_seconds is not None and self.last_seconds <= self.limit_seconds:
            return self._timed(work, *args)
        return await asyncio.to_thread(self._timed, work, *args)

    def _timed(self, work: Callable[..., T], *args: Any) -> T:
        started = time.thread_time()
        try:
            return work(*args)
        finally:
            self.last_seconds = time.thread_time() - started


def listener(bind: str) -> socket.socket:
    """A bound TCP socket for ``host:port``, ``[v6]:port`` or ``fd://N`` (a socket already bound,
    as func-python's ``sock.bind`` hands them over); the server makes it listen.

    Its ``proto`` must read IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    says TCP, and an accepted socket copies the listener's. With proto 0 (``socket.socket(AF_INET,
    SOCK_STREAM)``) every connection keeps Nagle's algorithm, and a reply written in two pieces (headers,
    then body) waits for the client's delayed ACK: 40 ms a request (measured through the activator).
    """
    if bind.startswith("fd://"):
        return socket.socket(fileno=int(bind.removeprefix("fd://")))  # proto read from the descriptor
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bind address {bind!r}: expected host:port, [ipv6]:port or fd://N")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    except OSError:
        sock.close()
        raise
    return sock


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh event loop, as ``asyncio.run`` does, with uvloop's loop
    (libuv under asyncio's API): every p2ptrain process spends most of its CPU in HTTP and Redis I/O
    callbacks, and uvloop runs those with less Python per callback."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def uvicorn_config(app: App, *, graceful_timeout: float) -> Any:
    """uvicorn's settings for every server p2ptrain runs.

    httptools parses requests in C; no access log, no Date/Server headers, no proxy-header rewriting
    (nothing here reads the client address); uvicorn's loggers keep our formatter (``log_config=None``)
    and speak only for warnings and errors. Idle keep-alive connections are kept longer than the
    client's pool keeps them (p2ptrain.poster: 15 s), so the client, not the server, closes an idle one and a
    request is never written into a connection the server is closing.
    """
    import uvicorn

    return uvicorn.Config(
        app, http="httptools", interface="asgi3", lifespan="auto", log_config=None, log_level="warning",
        access_log=False, server_header=False, date_header=False, proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # Typed int, used as asyncio.wait_for's timeout: a fraction of a second works (tests use 0.5).
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
    )


def stopped_quietly(app: App) -> App:
    """``app``, answering 503 to a request that is still running when the server stops.

    At the end of its graceful shutdown uvicorn cancels the requests still in flight (a call waiting
    for a cold start, say) and logs each as an "Exception in ASGI application" with its traceback.
    Being stopped is not an error of the application: the request gets 503 with its reason, and
    nothing is logged as one.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = False

        async def watched(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, watched)
        except asyncio.CancelledError:
            if not started:
                with contextlib.suppress(Exception):  # the client may be gone already
                    await respond(send, 503, b"the server is shutting down\n", reason="shutting-down", close=True)

    return wrapped


class _ShutdownCut(logging.Filter):
    """uvicorn's "Cancel N running task(s), timeout graceful shutdown exceeded" is logged as an error;
    the requests it cancels are answered 503 (``stopped_quietly``): an info line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "timeout graceful shutdown exceeded" in record.getMessage() and record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


async def serve(app: App, bind: list[str], stop: asyncio.Event, *, graceful_timeout: float = 2.0) -> None:
    """Serve ``app`` on every address of ``bind`` until ``stop`` is set, then shut down gracefully:
    stop accepting, let requests in flight finish for up to ``graceful_timeout`` seconds, run the
    lifespan shutdown. Signals stay with the caller (it sets ``stop``)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn would install its own SIGINT/SIGTERM handlers and re-raise the signal on exit;
            # the caller owns the signals and says when to stop through ``stop``.
            yield

    sockets = [listener(b) for b in bind]
    server = Server(uvicorn_config(stopped_quietly(app), graceful_timeout=graceful_timeout))
    cut = _ShutdownCut()
    logging.getLogger("uvicorn.error").addFilter(cut)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_asked())
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
        logging.getLogger("uvicorn.error").removeFilter(cut)
        for sock in sockets:
            sock.close()


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
