"""p2ptrain.poster against a real TCP server on loopback whose replies each test chooses: keep-alive
reuse, the three ways a body can end, every way a request can fail, the connection limit."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from p2ptrain.poster import Poster, PostError

Handler = Callable[[str, dict[str, str], bytes, asyncio.StreamWriter], Awaitable[bool]]


@pytest.fixture(params=["asyncio", "uvloop"])
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    """Both loops: p2ptrain's processes run uvloop (asgi.run), the tests' harness asyncio's own."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if request.param == "uvloop" else None) as loop:
        yield loop


def on_both_loops(case: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A synchronous test that runs the coroutine ``case`` on the ``runner`` fixture's loop: pytest sees
    the case's own parameters plus ``runner``, so each case runs once per loop."""

    def test(*args: Any, runner: asyncio.Runner, **kwargs: Any) -> None:
        runner.run(case(*args, **kwargs))

    signature = inspect.signature(case)
    runner_parameter = inspect.Parameter("runner", inspect.Parameter.KEYWORD_ONLY)
    test.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), runner_parameter]
    )
    test.__name__, test.__qualname__, test.__doc__ = case.__name__, case.__qualname__, case.__doc__
    return test


class Server:
    """HTTP/1.1 on 127.0.0.1: parses each request, lets ``handler`` answer; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self.handler(line.split(" ")[1], headers, body, writer)
                await writer.drain()
                if not keep:
                    return
        finally:
            self.open -= 1
            writer.close()


def reply(writer: asyncio.StreamWriter, body: bytes, status: str = "200 OK", extra: str = "") -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)


async def echo(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
    digest = hashlib.sha256(body).hexdigest()
    reply(writer, f"{path} {headers.get('ce-id', '-')} {len(body)} {digest}".encode(), extra="X-Twice: a\r\nX-Twice: b\r\n")
    return True


@on_both_loops
async def test_keep_alive_reuses_one_connection_and_delivers_body_headers_and_status() -> None:
    async with Server(echo) as server, Poster() as poster:
        bodies = [bytes([i]) * (1000 * i) for i in range(1, 6)] + [b"z" * 3_000_000]  # the last: two writes
        for i, body in enumerate(bodies):
            got = await poster.post(f"{server.url}/r?x={i}", headers={"ce-id": f"e{i}"}, content=body)
            assert got.status == 200
            assert got.text == f"/r?x={i} e{i} {len(body)} {hashlib.sha256(body).hexdigest()}"
            assert got.headers["x-twice"] == "a, b"
        assert server.connections == 1


@on_both_loops
async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    async def chunked(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        if path == "/chunked":
            writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")  # no length: ends with the connection
        return False

    async with Server(chunked) as server, Poster() as poster:
        first = await poster.get(f"{server.url}/chunked")
        assert (first.status, first.content) == (201, b"hello world")
        second = await poster.get(f"{server.url}/eof")
        assert (second.status, second.content) == (200, b"until the end")
        third = await poster.get(f"{server.url}/chunked")  # a new connection: the last one ended
        assert third.content == b"hello world"
        assert server.connections == 2


@on_both_loops
async def test_connection_close_reply_is_not_reused() -> None:
    async def closing(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        reply(writer, b"bye", extra="Connection: close\r\n")
        return False

    async with Server(closing) as server, Poster() as poster:
        for _ in range(3):
            assert (await poster.post(server.url, headers={}, content=b"x")).content == b"bye"
        assert server.connections == 3


@on_both_loops
async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def once(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        reply(writer, b"ok")  # claims keep-alive, then closes anyway
        return False

    async with Server(once) as server, Poster() as poster:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close reaches the client before the next request
            assert (await poster.post(server.url, headers={}, content=b"x")).content == b"ok"
        assert server.connections == 3


@on_both_loops
async def test_no_reply_in_time_is_a_timeout_post_error_and_the_connection_is_dropped() -> None:
    async def slow(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        if path == "/slow":
            await asyncio.sleep(5)
        reply(writer, b"late" if path == "/slow" else b"fast")
        return True

    async with Server(slow) as server, Poster(timeout_seconds=0.3) as poster:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PostError, match="Timeout") as caught:
            await poster.post(f"{server.url}/slow", headers={}, content=b"x")
        assert loop.time() - started < 2
        assert caught.value.connect is False  # it was sent: the server may have taken it
        # The timed-out connection is not reused: a late "late" must not answer the next request.
        assert (await poster.post(f"{server.url}/fast", headers={}, content=b"x")).content == b"fast"
        assert server.connections == 2


@on_both_loops
async def test_refused_connection_is_a_connect_error() -> None:
    async with Server(echo) as server:
        url = server.url
    await asyncio.sleep(0.05)
    async with Poster() as poster:
        with pytest.raises(PostError, match="ConnectError") as caught:
            await poster.post(url, headers={}, content=b"x")
        assert caught.value.connect is True


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",  # closed mid-body
    b"",  # closed without a word
])
@on_both_loops
async def test_a_connection_that_breaks_before_the_reply_is_whole_is_a_post_error(answer: bytes) -> None:
    async def broken(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        return False

    async with Server(broken) as server, Poster() as poster:
        with pytest.raises(PostError, match="closed before the reply was complete"):
            await poster.post(server.url, headers={}, content=b"x")


@on_both_loops
async def test_a_malformed_reply_is_a_post_error_and_the_poster_keeps_working() -> None:
    async def garbage(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        if path == "/bad":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            return True
        reply(writer, b"fine")
        return True

    async with Server(garbage) as server, Poster() as poster:
        with pytest.raises(PostError, match="malformed reply"):
            await poster.post(f"{server.url}/bad", headers={}, content=b"x")
        assert (await poster.post(f"{server.url}/good", headers={}, content=b"x")).content == b"fine"


@on_both_loops
async def test_at_most_max_connections_requests_are_in_flight() -> None:
    async def slowish(path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        reply(writer, body)
        return True

    async with Server(slowish) as server, Poster(max_connections=2) as poster:
        replies = await asyncio.gather(*(poster.post(server.url, headers={}, content=b"%d" % i) for i in range(8)))
        assert [r.content for r in replies] == [b"%d" % i for i in range(8)]
        assert server.most_open == 2


@pytest.mark.parametrize("headers", [{"x-evil": "a\r\nInjected: 1"}, {"bad\nname": "v"}, {"x-uni": "snow \u2603"}])
@on_both_loops
async def test_a_header_that_cannot_be_sent_is_refused_before_anything_is_written(headers: dict[str, str]) -> None:
    async with Server(echo) as server, Poster() as poster:
        with pytest.raises(ValueError, match="header"):
            await poster.post(server.url, headers=headers, content=b"x")
        assert server.connections == 0


@on_both_loops
async def test_a_url_that_is_not_http_is_refused() -> None:
    async with Poster() as poster:
        with pytest.raises(ValueError, match="not an http"):
            await poster.get("ftp://example.invalid/x")
