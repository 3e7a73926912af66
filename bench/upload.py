"""Oversize uploads to the gradient function: how fast ``p2ptrain function`` refuses them, and how its
readiness probe answers while an upload is open.

Starts a real function process (hypercorn on LISTEN_ADDRESS) and times (a) a 100 MB upload declared by
Content-Length, (b) a 100 MB chunked upload sent as fast as possible until the 413 arrives, and (c)
readiness latency while an upload under the budget stays open. Median of several repetitions.
Usage: ``python bench/upload.py [--mb 100] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2ptrain.config import CONFIG_ENV, REDIS_PASSWORD_ENV, SIGNING_KEY_ENV, RedisAddress, RuntimeConfig
from p2ptrain.gradient import MAX_REQUEST_BYTES
from p2ptrain.redis_server import free_port
from p2ptrain.spec import parse_manifest

HEADERS = ("ce-specversion: 1.0\r\nce-id: 1\r\nce-source: /x\r\nce-type: dev.p2ptrain.gradient.requested.v1\r\n"
           "content-type: application/json\r\n")


def readiness_seconds(port: int) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health/readiness")
    status = connection.getresponse().status
    connection.close()
    if status != 200:
        raise RuntimeError(f"readiness answered {status}")
    return time.perf_counter() - started


def status_within(sock: socket.socket, timeout: float) -> int | None:
    if not select.select([sock], [], [], timeout)[0]:
        return None
    return int(sock.recv(65536).split(b"\r\n", 1)[0].split()[1])


def declared(port: int, size: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nhost: fn\r\n{HEADERS}content-length: {size}\r\n\r\n".encode())
        assert status_within(sock, 30) == 413
    return time.perf_counter() - started


def chunked(port: int, size: int) -> tuple[float, int]:
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nhost: fn\r\n{HEADERS}transfer-encoding: chunked\r\n\r\n".encode())
        status = None
        try:
            while sent < size and status is None:
                sock.sendall(frame)
                sent += len(chunk)
                status = status_within(sock, 0)
            status = status or status_within(sock, 30)
        except (BrokenPipeError, ConnectionResetError):
            status = 413  # closed after answering: the answer was lost to the reset
    assert status == 413, status
    return time.perf_counter() - started, sent


def readiness_during_upload(port: int, probes: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nhost: fn\r\n{HEADERS}transfer-encoding: chunked\r\n\r\n".encode())
        half = b"x" * (MAX_REQUEST_BYTES // 2)
        sock.sendall(b"%x\r\n%s\r\n" % (len(half), half))
        return [readiness_seconds(port) for _ in range(probes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.mb * 1000 * 1000
    manifest = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "bench"},
                "spec": {"peers": 1, "model": {"name": "logreg"}, "dataset": {"name": "digits"}}}
    config = RuntimeConfig(parse_manifest(manifest), ("http://127.0.0.1:1",), (RedisAddress("127.0.0.1", 1),), "http://x")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(config.to_json())
        env = {**os.environ, "LISTEN_ADDRESS": f"127.0.0.1:{port}", CONFIG_ENV: str(job),
               REDIS_PASSWORD_ENV: "bench", SIGNING_KEY_ENV: "bench"}
        process = subprocess.Popen([sys.executable, "-m", "p2ptrain", "function"], env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    readiness_seconds(port)
                    break
                except (OSError, RuntimeError):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.1)
            idle = statistics.median(readiness_seconds(port) for _ in range(20))
            declared_s = statistics.median(declared(port, size) for _ in range(args.repeat))
            runs = [chunked(port, size) for _ in range(args.repeat)]
            during = statistics.median(readiness_during_upload(port, 20))
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"budget {MAX_REQUEST_BYTES} B; upload {size} B; median of {args.repeat}")
    print(f"declared Content-Length upload refused (413) in {declared_s * 1000:.2f} ms, no body byte read")
    print(f"chunked upload refused (413) in {statistics.median(r[0] for r in runs) * 1000:.2f} ms "
          f"after {statistics.median(r[1] for r in runs)} bytes sent")
    print(f"readiness: {idle * 1000:.2f} ms idle, {during * 1000:.2f} ms with an upload open")


if __name__ == "__main__":
    main()
