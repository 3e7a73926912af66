"""p2ptrain.bulkread: large values received straight into their buffer give redis-py's answers, and
its failures (closed socket, timeout, broken framing) are redis-py's errors. Real redis-server; the
failure cases use a socket pair, since no real Redis can be made to cut a reply in the middle."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import redis

from p2ptrain import bulkread
from p2ptrain.config import RedisAddress
from p2ptrain.store import connect

SIZES = [0, 1, 100, bulkread.DIRECT_BYTES - 1, bulkread.DIRECT_BYTES, bulkread.DIRECT_BYTES + 1, 4_505_640, 9_000_001]


@pytest.fixture
def client(redis_server) -> redis.Redis:
    assert bulkread.PARSER is not None, "redis-py's parser internals changed: p2ptrain.bulkread needs a look"
    client = connect(RedisAddress(redis_server.host, redis_server.port), redis_server.password, socket_timeout=10)
    client.ping()
    assert isinstance(client.connection_pool.get_connection()._parser, bulkread.PARSER)
    return client


def test_values_of_every_size_come_back_as_they_were_stored(client: redis.Redis) -> None:
    values = {size: os.urandom(size) for size in SIZES}
    for size, value in values.items():
        client.set(f"k{size}", value)
    for size, value in values.items():
        got = client.get(f"k{size}")
        # A large value is handed over as the buffer it was received into: no copy into a bytes.
        assert type(got) is (bytearray if size >= bulkread.DIRECT_BYTES else bytes) and got == value, size
    assert client.get("missing") is None


def test_a_pipeline_mixing_large_and_small_replies_keeps_each_in_its_place(client: redis.Redis) -> None:
    big, other = os.urandom(3_000_000), os.urandom(bulkread.DIRECT_BYTES)
    client.set("big", big)
    client.set("other", other)
    client.hset("h", mapping={"a": "1", "b": big})
    pipe = client.pipeline(transaction=False)
    pipe.get("big").get("missing").incr("n").get("other").hget("h", "b").mget("big", "other", "missing")
    pipe.get("big")
    assert pipe.execute() == [big, None, 1, other, big, [big, other, None], big]
    with pytest.raises(redis.ResponseError):  # an error reply after a large value is still an error
        client.pipeline(transaction=False).get("big").hincrby("big", "x", 1).execute()
    assert client.get("big") == big  # and the connection still answers in order


def _buffer(sock: socket.socket, timeout: float = 5.0):
    assert bulkread.PARSER is not None
    sock.settimeout(timeout)
    return bulkread.PARSER.buffer_class(sock, 65536, timeout)


def _send_later(sock: socket.socket, data: bytes, *, close: bool = False) -> threading.Thread:
    """Send from another thread: a socket pair holds less than a large value until it is read."""
    def send() -> None:
        sock.sendall(data)
        if close:
            sock.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_value_partly_received_before_the_read_is_completed_from_the_socket() -> None:
    ours, theirs = socket.socketpair()
    value = os.urandom(2_000_000)
    theirs.sendall(b"$%d\r\n" % len(value) + value[:1000])  # the header and the first bytes arrive first
    buffer = _buffer(ours)
    assert buffer.readline() == b"$%d" % len(value)
    sender = threading.Timer(0.1, lambda: theirs.sendall(value[1000:] + b"\r\n+OK\r\n"))
    sender.start()
    assert buffer.read(len(value)) == value
    assert buffer.readline() == b"+OK"  # the next reply stays where redis-py reads it
    sender.join()


def test_a_terminator_that_arrives_after_the_value_is_read_from_the_socket() -> None:
    ours, theirs = socket.socketpair()
    value = os.urandom(300_000)
    theirs.sendall(b"$%d\r\n" % len(value))
    buffer = _buffer(ours)
    assert buffer.readline() == b"$%d" % len(value)
    sender = _send_later(theirs, value + b"\r")  # the value and half its CRLF, the rest later
    later = threading.Timer(0.1, lambda: theirs.sendall(b"\n:7\r\n"))
    later.start()
    got = buffer.read(len(value))
    assert type(got) is bytearray and got == value
    assert buffer.readline() == b":7"
    sender.join()
    later.join()


def test_a_socket_closed_in_the_middle_of_a_value_is_a_connection_error() -> None:
    ours, theirs = socket.socketpair()
    sender = _send_later(theirs, b"$1000000\r\n" + b"x" * 500_000, close=True)
    buffer = _buffer(ours)
    assert buffer.readline() == b"$1000000"
    with pytest.raises(redis.ConnectionError, match="Connection closed by server"):
        buffer.read(1_000_000)
    sender.join()


def test_a_value_that_stops_arriving_times_out() -> None:
    ours, theirs = socket.socketpair()
    sender = _send_later(theirs, b"$1000000\r\n" + b"x" * 500_000)
    buffer = _buffer(ours, timeout=0.2)
    assert buffer.readline() == b"$1000000"
    with pytest.raises(redis.TimeoutError):
        buffer.read(1_000_000)
    sender.join()
    theirs.close()


def test_a_value_without_its_terminator_is_refused() -> None:
    ours, theirs = socket.socketpair()
    sender = _send_later(theirs, b"$300000\r\n" + b"x" * 300_000 + b"!!")
    buffer = _buffer(ours)
    buffer.readline()
    with pytest.raises(redis.ConnectionError, match="not followed by CRLF"):
        buffer.read(300_000)
    sender.join()
