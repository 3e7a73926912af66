"""Large module operations run in slices: Redis keeps answering, other module calls wait their turn.

A real redis-server with the module; the PINGs come from a separate process (bench/pinger.py) so
the measuring client never waits on this process's GIL. The assertions are structural (PINGs answered
while the operation was executing; a MEAN never sees half an ACCUM), not timings: the figures are
printed by bench/accumulate.py.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from p2ptrain import wire
from p2ptrain.dbupdate import ModelUpdater, SgdSettings, read_model
from p2ptrain.redis_server import RedisServer

PINGER = Path(__file__).resolve().parents[2] / "bench" / "pinger.py"
LARGE = 10_000_000


@pytest.fixture
def module_redis(redis_module: Path) -> Iterator[RedisServer]:
    with RedisServer(password=secrets.token_hex(16), module=redis_module) as server:
        yield server


def _command(*parts: bytes | str) -> bytes:
    chunks = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        chunks += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    return b"".join(chunks)


def _timed_raw_call(server: RedisServer, command: bytes) -> tuple[float, float, bytes]:
    """(time the request was fully handed to the kernel, time the reply arrived, reply)."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(_command("AUTH", server.password))
        assert sock.recv(64).startswith(b"+OK")
        sock.sendall(command)
        sent = time.monotonic()
        reply = sock.recv(64)
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(64)
        return sent, time.monotonic(), reply


def test_redis_answers_ping_while_a_large_sgd_step_runs(module_redis: RedisServer) -> None:
    client = module_redis.client()
    start = np.random.default_rng(0).standard_normal(LARGE).astype(np.float32)
    grad = np.random.default_rng(1).standard_normal(LARGE).astype(np.float32)
    client.set("model:0", wire.encode_tensor(start))
    pinger = subprocess.Popen(
        [sys.executable, str(PINGER), module_redis.host, str(module_redis.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert pinger.stdin is not None and pinger.stdout is not None
        pinger.stdin.write(module_redis.password + "\n")
        pinger.stdin.flush()
        assert pinger.stdout.readline().strip() == "ready"
        sent, answered, reply = _timed_raw_call(
            module_redis, _command("P2P.SGD", "model:0", "model:1", "buf", grad.tobytes(), "0.1", "0.9", "0", "0", "0")
        )
        pinger.stdin.close()
        samples = json.loads(pinger.stdout.readline())
    finally:
        pinger.kill()
        pinger.wait()
    assert reply == b":1\r\n"
    # Served strictly inside the step's execution: asked after the request was in, answered before
    # the step's reply. Run in one piece, the step would let at most one PING slip in at its end.
    during = [s for s in samples if s[0] > sent and s[1] < answered]
    assert len(during) >= 3, f"{len(during)} PINGs answered during a {answered - sent:.3f} s step"
    np.testing.assert_allclose(read_model(client, "model:1"), start - 0.1 * grad, rtol=1e-6, atol=1e-6)


def test_a_mean_never_sees_half_of_a_sliced_accum(module_redis: RedisServer) -> None:
    blob = np.full(LARGE // 2, 3.0, dtype=np.float32).tobytes()
    done = threading.Event()

    def accumulate() -> None:
        _timed_raw_call(module_redis, _command("P2P.ACCUM", "acc", "meta", "part0", "2", blob))
        done.set()

    worker = threading.Thread(target=accumulate)
    worker.start()
    reader = module_redis.client()
    try:
        # Poll until the accumulator exists: the first MEAN that finds it must find it complete.
        deadline = time.monotonic() + 60
        while (mean := reader.execute_command("P2P.MEAN", "acc", "meta")) is None:
            assert time.monotonic() < deadline, "the ACCUM never became visible"
    finally:
        worker.join()
    values = np.frombuffer(mean[0], dtype="<f4")
    assert values.size == LARGE // 2 and float(mean[1]) == 2.0
    np.testing.assert_array_equal(values, np.full(LARGE // 2, 3.0, dtype=np.float32))


def test_queued_steps_run_in_order(module_redis: RedisServer) -> None:
    """Two sliced steps on one chain of versions, sent together: the second waits for the first."""
    client = module_redis.client()
    updater = ModelUpdater("module")
    size = 3_000_000
    client.set("model:0", wire.encode_tensor(np.zeros(size, np.float32)))
    grad = np.ones(size, np.float32)
    settings = SgdSettings(lr=1.0, momentum=0.5)
    first = threading.Thread(target=updater.step, args=(module_redis.client(), settings, "model:0", "model:1", "buf", grad))
    first.start()
    deadline = time.monotonic() + 60
    while not client.exists("model:1"):  # the first step has started (its target exists, half written)
        assert time.monotonic() < deadline
    assert updater.step(client, settings, "model:1", "model:2", "buf", grad)
    first.join()
    # torch: buf = 1, p = -1; buf = 0.5 + 1 = 1.5, p = -2.5 (only if step 2 read step 1's whole output)
    np.testing.assert_array_equal(read_model(client, "model:2"), np.full(size, -2.5, np.float32))


def test_a_transaction_touching_a_key_in_flight_is_refused(module_redis: RedisServer) -> None:
    """MULTI cannot wait for a sliced operation: it gets BUSY rather than half a result.

    Whether the transaction lands while the ACCUM is in flight is up to the scheduler, so a complete
    result (it landed after) is retried; any other reply than BUSY or the complete mean fails.
    """
    blob = np.ones(LARGE, dtype=np.float32).tobytes()
    client = module_redis.client()
    for attempt in range(5):
        acc, meta = f"acc{attempt}", f"meta{attempt}"
        worker = threading.Thread(
            target=_timed_raw_call, args=(module_redis, _command("P2P.ACCUM", acc, meta, "part0", "1", blob))
        )
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while not client.exists(acc):  # the ACCUM has started
                assert time.monotonic() < deadline
            pipe = client.pipeline(transaction=True)
            pipe.execute_command("P2P.MEAN", acc, meta)
            (reply,) = pipe.execute(raise_on_error=False)
        finally:
            worker.join()
        assert client.execute_command("P2P.MEAN", acc, meta)[2] == 1  # the ACCUM itself completed
        if isinstance(reply, Exception):
            assert "BUSY" in str(reply)
            return
        assert reply[1:] == [b"1", 1] and np.all(np.frombuffer(reply[0], dtype="<f4") == 1.0)
    pytest.fail("the transaction never landed while the ACCUM was in flight (5 attempts)")


def test_a_sliced_meanstore_replies_and_parks_the_same_mean(module_redis: RedisServer) -> None:
    """Above 2^21 floats P2P.MEANSTORE runs in slices, and other commands may touch the parked key
    before the reply: the reply is the mean it computed, and the key holds it as a wire tensor."""
    client = module_redis.client()
    n = 3_000_000
    rng = np.random.default_rng(5)
    for part, weight in (("a", "1"), ("b", "3")):
        client.execute_command("P2P.ACCUM", "acc", "meta", part, weight, rng.standard_normal(n).astype("<f4").tobytes())
    stored = client.execute_command("P2P.MEANSTORE", "acc", "meta", "out", "EX", "60")
    mean = client.execute_command("P2P.MEAN", "acc", "meta")
    assert stored[1:] == mean[1:] == [b"4", 2]
    assert bytes(stored[0]) == bytes(mean[0])
    parked = wire.decode_tensor(bytes(client.get("out")), expected_numel=n)
    np.testing.assert_array_equal(parked, np.frombuffer(bytes(mean[0]), dtype="<f4"))
    assert 0 < client.ttl("out") <= 60


def test_commands_with_too_few_arguments_are_refused_and_redis_keeps_serving(module_redis: RedisServer) -> None:
    """Every short form of the model-update commands gets Redis's arity error (none reads an argument
    that is not there), and the server goes on answering."""
    client = module_redis.client()
    for command, fixed in (("P2P.SGD", 10), ("P2P.ADAM", 11), ("P2P.MEANSTORE", 4), ("P2P.ACCUM", 6)):
        for argc in range(1, fixed):
            with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
                client.execute_command(command, *[f"a{i}" for i in range(1, argc)])
    assert client.ping()
