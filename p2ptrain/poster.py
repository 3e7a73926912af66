"""The HTTP client of the hot paths: the peer's gradient function calls and gradient posts, and the
local activator's forwarding. Keep-alive HTTP/1.1: asyncio connections whose replies httptools parses
(the C parser uvicorn serves with: Content-Length, chunked and close-delimited bodies, keep-alive).

Why not a general client: a call here is one small POST answered by one small reply, dozens of them a
round per process, and aiohttp's request machinery (cookies, redirects, proxies, auth, URL objects,
timers) cost 0.3-0.45 ms of CPU per request where this costs 0.1-0.14 ms (docs/bench-call.md); on a
machine whose cores every peer, function and Redis share, that is round time. httpx costs more still.

Replies are read whole into a small immutable :class:`Reply`; every way a request can fail to get one
(connection refused or reset, timeout, malformed reply) raises :class:`PostError`, and the connection
it used is closed, never reused. Nothing is retried here: callers own their retries (a POST may have
been taken before its connection broke; the receivers deduplicate by round and event id).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import httptools

# An idle connection is dropped after this long: well under the servers' keep-alive
# (asgi.KEEP_ALIVE_SECONDS), so the client, not the server, ends it and a request is never written into
# a connection the server is closing.
IDLE_SECONDS = 15.0
_LARGE_BODY = 64 * 1024  # up to this, headers and body leave in one write (one syscall, one segment)
_Key = tuple[str, str, int]  # scheme, host, port


class PostError(Exception):
    """No reply: the connection failed, broke, or timed out. ``connect`` is True when it was never made."""

    def __init__(self, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.connect = connect


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; httptools calls the ``on_*`` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's: an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: this connection can no longer be trusted
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # HttpParserUpgrade included
            self._fail(f"malformed reply: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done() and self._close_delimited():
            self._deliver()  # a body without a length ends with the connection
        self._fail("ServerDisconnectedError: the connection closed before the reply was complete")

    # httptools
    def on_message_begin(self) -> None:
        self._headers, self._body, self._headers_done = {}, [], False

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # an interim reply (100 Continue): the real one follows
            return
        self._deliver()
        if not self.parser.should_keep_alive():
            self.close()

    # ours
    def _close_delimited(self) -> bool:
        return (self._headers_done and "content-length" not in self._headers
                and "chunked" not in self._headers.get("transfer-encoding", "").lower())

    def _deliver(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self.parser.get_status_code(), self._headers, b"".join(self._body)))

    def _fail(self, message: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(PostError(message))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _request_head(method: str, target: str, host: str, headers: dict[str, str] | None, length: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    for name, value in (headers or {}).items():
        if name.lower() in ("host", "content-length", "transfer-encoding"):
            continue  # ours, from the URL and the body
        if any(c in name or c in value for c in "\r\n\0") or ":" in name or not name:
            raise ValueError(f"HTTP header {name!r} has a name or value that cannot be sent (line break, NUL, colon)")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"an HTTP header is not latin-1 text: {exc}") from exc


class Poster:
    """A pool of keep-alive connections; create and close it inside one event loop."""

    def __init__(self, *, max_connections: int = 64, timeout_seconds: float = 60.0) -> None:
        self.max_connections = max_connections
        self.timeout_seconds = timeout_seconds
        self._slots = asyncio.Semaphore(max_connections)  # requests in flight, each on its own connection
        self._idle: dict[_Key, list[_Connection]] = {}
        self._urls: dict[str, tuple[_Key, str, str]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _parse(self, url: str) -> tuple[_Key, str, str]:
        parsed = self._urls.get(url)
        if parsed is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rpartition("@")[2]  # never the userinfo
            parsed = ((parts.scheme, parts.hostname, port), target, host)
            if len(self._urls) > 4096:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def _connection(self, key: _Key) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and loop.time() - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        scheme, host, port = key
        context = None
        if scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            context = self._ssl
        try:  # asyncio sets TCP_NODELAY on TCP connections: no Nagle stall between head and body writes
            transport, conn = await loop.create_connection(_Connection, host, port, ssl=context)
        except OSError as exc:
            raise PostError(f"ConnectError: cannot connect to {host}:{port}: {exc}", connect=True) from exc
        conn.transport = transport  # uvloop may call connection_made only after this returns
        return conn

    def _release(self, key: _Key, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle = self._idle.setdefault(key, [])
        idle.append(conn)
        if len(idle) > self.max_connections:
            idle.pop(0).close()

    async def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, content: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        key, target, host = self._parse(url)
        limit = timeout if timeout is not None else self.timeout_seconds
        head = _request_head(method, target, host, headers, len(content) if content or method != "GET" else None)
        async with self._slots:
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(limit):
                    conn = await self._connection(key)
                    assert conn.transport is not None
                    waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                    conn.waiter = waiter
                    if len(content) <= _LARGE_BODY:
                        conn.transport.write(head + content)
                    else:  # no joined copy of a large body; TCP_NODELAY sends the head at once
                        conn.transport.write(head)
                        conn.transport.write(content)
                    reply = await waiter
            except TimeoutError as exc:
                if conn is not None:
                    conn.close()
                raise PostError(f"Timeout: no reply from {url} within {limit}s", connect=conn is None) from exc
            except BaseException:  # a failed or cancelled request leaves its connection in no known state
                if conn is not None:
                    conn.close()
                raise
            self._release(key, conn)
            return reply

    async def post(self, url: str, *, headers: dict[str, str], content: bytes, timeout: float | None = None) -> Reply:
        return await self.request("POST", url, headers=headers, content=content, timeout=timeout)

    async def get(self, url: str, *, timeout: float | None = None) -> Reply:
        return await self.request("GET", url, timeout=timeout)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        await asyncio.sleep(0)  # one loop turn lets the transports close before the loop ends

    async def __aenter__(self) -> Poster:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
