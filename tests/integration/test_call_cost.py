"""What keeps a gradient function call cheap, against real servers: the hot-path client reuses one
keep-alive connection and reports every failure as PostError; an accumulate is one Redis round trip
(module and Lua, also after Redis lost the Lua library); a request that waited for a starting
instance counts as cold, not warm. Timing figures: bench/call.py (docs/bench-call.md)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis

from p2ptrain import asgi
from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS, detect
from p2ptrain.poster import Poster, PostError
from p2ptrain.redis_server import RedisServer, free_port

from .test_autoscale import _post, service_factory  # noqa: F401  (the fixture, with its stand-in function)


@pytest.fixture
async def counting_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A real server (``asgi.serve``) that answers every POST with its body and counts accepted connections."""
    connections: list[int] = []

    async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        client = scope["client"]
        if client not in connections:
            connections.append(client)
        body = await asgi.read_body(receive, 1 << 20)
        await asgi.respond(send, 200, body or b"", reason="echo")

    port = free_port()
    stop = asyncio.Event()
    serving = asyncio.create_task(asgi.serve(app, [f"127.0.0.1:{port}"], stop))
    url = f"http://127.0.0.1:{port}/"
    async with Poster() as probe:
        for _ in range(200):
            try:
                await probe.get(url, timeout=1)
                break
            except PostError:
                await asyncio.sleep(0.05)
    connections.clear()
    try:
        yield url, connections
    finally:
        stop.set()
        await serving


async def test_sequential_posts_reuse_one_keep_alive_connection(counting_server) -> None:
    url, connections = counting_server
    async with Poster() as poster:
        replies = [await poster.post(url, headers={"content-type": "application/json"}, content=b"[%d]" % i)
                   for i in range(20)]
    assert [r.content for r in replies] == [b"[%d]" % i for i in range(20)]
    assert all(r.status == 200 and r.headers["x-p2ptrain-reason"] == "echo" for r in replies)
    assert len(connections) == 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("form", ["host:port", "fd://N"])
def test_the_servers_accepted_connections_have_nagle_off(form: str, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``asgi.serve`` hands its listeners to uvicorn, which accepts through ``loop.create_server(sock=...)``,
    as done here, on the loop every p2ptrain process runs (``asgi.run``: uvloop) and on asyncio's own.
    asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP: with Nagle left on, a reply
    written as headers then body waits ~40 ms for the client's delayed ACK."""
    port = free_port()
    if form == "fd://N":  # what ``p2ptrain function`` serves on: sockets bound by func-python
        from func_python.sock import bind

        monkeypatch.setenv("LISTEN_ADDRESS", f"127.0.0.1:{port}")
        (address,) = bind()
    else:
        address = f"127.0.0.1:{port}"

    async def nodelay_of_accepted() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Record, sock=asgi.listener(address))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            result = await asyncio.wait_for(accepted, timeout=10)
            writer.close()
            return result
        finally:
            server.close()
            await server.wait_closed()

    if loop == "uvloop":
        assert type(asgi.run(_loop_type())).__module__.startswith("uvloop"), "asgi.run must run uvloop's loop"
        assert asgi.run(nodelay_of_accepted()) != 0
    else:
        with asyncio.Runner() as runner:
            assert runner.run(nodelay_of_accepted()) != 0


async def _loop_type() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_a_bad_bind_address_is_refused_naming_the_forms_accepted() -> None:
    with pytest.raises(ValueError, match="'localhost': expected host:port"):
        asgi.listener("localhost")


async def test_a_refused_connection_is_a_connect_post_error() -> None:
    port = free_port()  # nothing listens here
    async with Poster() as poster:
        with pytest.raises(PostError) as caught:
            await poster.post(f"http://127.0.0.1:{port}/", headers={}, content=b"x")
    assert caught.value.connect


async def test_no_reply_within_the_timeout_is_a_post_error() -> None:
    with socket.socket() as listener:  # accepts (the kernel's backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        async with Poster() as poster:
            with pytest.raises(PostError, match="Timeout") as caught:
                await poster.post(url, headers={}, content=b"x", timeout=0.3)
    assert not caught.value.connect


def _count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every write of commands to Redis: a pipeline is one write, then its replies are read."""
    sent: list[int] = []
    original = redis.connection.Connection.send_packed_command

    def counting(self: redis.connection.Connection, command: object, check_health: bool = True) -> None:
        sent.append(1)
        original(self, command, check_health)  # type: ignore[arg-type]

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    return sent


def test_an_accumulate_is_one_round_trip_and_sets_both_ttls(accumulating_redis, monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    client.ping()  # the connection exists before counting
    sent = _count_round_trips(monkeypatch)
    assert accumulator.add(client, "acc", "meta", "0:0", 2.0, np.ones(16, dtype="<f4").tobytes())
    assert len(sent) == 1
    assert all(0 < client.ttl(key) <= ROUND_KEY_TTL_SECONDS for key in ("acc", "meta"))


def test_a_lua_accumulate_after_redis_lost_the_library_loads_it_and_sets_the_ttls(redis_server: RedisServer) -> None:
    client = redis_server.client()
    accumulator = detect(client, "lua")
    client.function_flush()  # as a Redis that restarted empty
    assert accumulator.add(client, "acc", "meta", "0:0", 1.0, np.ones(4, dtype="<f4").tobytes())
    assert all(0 < client.ttl(key) <= ROUND_KEY_TTL_SECONDS for key in ("acc", "meta"))
    assert accumulator.mean(client, "acc", "meta") is not None


async def test_requests_that_waited_for_a_starting_instance_count_as_cold(service_factory) -> None:  # noqa: F811
    service = service_factory(max_scale=1, container_concurrency=2)
    await service.start()
    try:
        await asyncio.gather(_post(service), _post(service))  # both wait for the one cold start
        await _post(service)  # warm
    finally:
        await service.stop()
    stats = service.stats.as_dict()
    assert len(service.stats.cold_request_seconds) == 2 and len(service.stats.warm_request_seconds) == 1
    assert stats["warm_request_seconds_median"] == service.stats.warm_request_seconds[0]
    assert stats["warm_request_seconds_p10"] == stats["warm_request_seconds_p90"] == stats["warm_request_seconds_median"]
