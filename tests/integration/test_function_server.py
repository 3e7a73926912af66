"""``p2ptrain function`` as a real process on LISTEN_ADDRESS (uvicorn, func-python's health routes):
it refuses to start without its config or secrets, and refuses oversize bodies before reading them
while its readiness probe keeps answering. Timing figures: bench/upload.py."""

from __future__ import annotations

import http.client
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2ptrain import retry
from p2ptrain.config import CONFIG_ENV, REDIS_PASSWORD_ENV, SIGNING_KEY_ENV, RedisAddress, RuntimeConfig
from p2ptrain.gradient import MAX_REQUEST_BYTES
from p2ptrain.redis_server import free_port

from .harness import make_spec

UPLOAD_BYTES = 100 * 1000 * 1000
EVENT_HEADERS = (
    "ce-specversion: 1.0\r\nce-id: 1\r\nce-source: /x\r\nce-type: dev.p2ptrain.gradient.requested.v1\r\n"
    "ce-signature: 00\r\ncontent-type: application/json\r\n"
)


def job_file(tmp_path: Path) -> Path:
    spec = make_spec(name="fnserver", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress("127.0.0.1", 1),), "http://x")
    path = tmp_path / "job.json"
    path.write_text(config.to_json())
    return path


def function_env(port: int, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, REDIS_PASSWORD_ENV, SIGNING_KEY_ENV)}
    return {**base, "LISTEN_ADDRESS": f"127.0.0.1:{port}", **env}


def start_function(port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "p2ptrain", "function"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def readiness(port: int) -> tuple[int, float]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health/readiness")
        status = connection.getresponse().status
    finally:
        connection.close()
    return status, time.perf_counter() - started


@pytest.fixture
def function_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = start_function(port, function_env(
        port, **{CONFIG_ENV: str(job_file(tmp_path)), REDIS_PASSWORD_ENV: "pw", SIGNING_KEY_ENV: "key"}))
    try:
        def ready() -> bool:
            try:
                return readiness(port)[0] == 200
            except OSError:
                return False

        try:
            retry.wait_until_ready(ready, process, "function readiness", timeout=60)
        except retry.NotReady as exc:
            pytest.fail(f"{exc}: {process.communicate(timeout=30)[1][-2000:]!r}")
        yield port
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.parametrize(
    "env,names",
    [({}, [CONFIG_ENV]), ({CONFIG_ENV: "{job}"}, [REDIS_PASSWORD_ENV, SIGNING_KEY_ENV]),
     ({CONFIG_ENV: "/nonexistent/job.json", REDIS_PASSWORD_ENV: "s3cr3t-pw", SIGNING_KEY_ENV: "s3cr3t-key"},
      ["/nonexistent/job.json"])],
    ids=["no-config", "no-secrets", "unreadable-config"],
)
def test_a_function_without_its_config_or_secrets_exits_naming_what_is_missing(
    tmp_path: Path, env: dict[str, str], names: list[str]
) -> None:
    env = {k: v.replace("{job}", str(job_file(tmp_path))) for k, v in env.items()}
    process = start_function(free_port(), function_env(free_port(), **env))
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the function kept running without its config or secrets")
    assert process.returncode == 1
    assert "gradient function cannot start" in stderr
    for name in names:
        assert name in stderr
    assert "s3cr3t" not in stderr  # secrets' values are never logged


def _response_status(sock: socket.socket, timeout: float) -> int | None:
    """The status of a response already on its way, or None if none arrives within ``timeout``."""
    if not select.select([sock], [], [], timeout)[0]:
        return None
    head = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_a_declared_100_mb_upload_is_refused_before_its_body_is_sent(function_port: int) -> None:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", function_port), timeout=10) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nhost: fn\r\n{EVENT_HEADERS}content-length: {UPLOAD_BYTES}\r\n\r\n".encode())
        status = _response_status(sock, timeout=10)
    print(f"\ndeclared {UPLOAD_BYTES} B upload: {status} after {time.perf_counter() - started:.3f} s, 0 body bytes sent")
    assert status == 413
    assert readiness(function_port)[0] == 200


def test_a_streamed_100_mb_upload_is_refused_at_the_budget_and_readiness_answers_meanwhile(function_port: int) -> None:
    chunk = b"x" * 65536
    sent = 0
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", function_port), timeout=10) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nhost: fn\r\n{EVENT_HEADERS}transfer-encoding: chunked\r\n\r\n".encode())

        def send_chunk() -> None:
            nonlocal sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)

        while sent + len(chunk) <= MAX_REQUEST_BYTES // 2:
            send_chunk()
        # Half the budget is in and the upload is still open: the probe must not wait for it.
        ready_status, ready_seconds = readiness(function_port)
        assert _response_status(sock, timeout=0) is None, "answered before the budget was crossed"
        while sent <= MAX_REQUEST_BYTES:
            send_chunk()
        status = _response_status(sock, timeout=10)
    print(f"\nstreamed upload: {status} after {sent} of {UPLOAD_BYTES} B in {time.perf_counter() - started:.3f} s;"
          f" readiness meanwhile {ready_status} in {ready_seconds * 1000:.1f} ms")
    assert ready_status == 200
    assert status == 413 and sent < UPLOAD_BYTES
    assert readiness(function_port)[0] == 200
