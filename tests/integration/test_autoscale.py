"""The local stand-in for a Knative Service: scale from zero, within concurrency, to zero, after crashes.

Instances are real processes serving real HTTP; a tiny stdlib server stands in for the gradient
function so that these tests exercise the autoscaler alone (the function itself is tested elsewhere).
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from p2ptrain.autoscale import LocalFunctionService, child_env
from p2ptrain.spec import FunctionSpec

SERVER = textwrap.dedent(
    """
    import os, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, body):
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._reply(b"ok")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(float(os.environ.get("WORK_SECONDS", "0.3")))
            self._reply(str(os.getpid()).encode())

    host, port = os.environ["LISTEN_ADDRESS"].rsplit(":", 1)
    time.sleep(0.2)  # a cold start
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
    """
)


@pytest.fixture
def service_factory(tmp_path: Path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)

    def make(**scale: float) -> LocalFunctionService:
        """A service; each test stops it in its own event loop (``finally: await service.stop()``)."""
        spec = FunctionSpec(**{"max_scale": 2, "container_concurrency": 1, "idle_seconds": 30, **scale})  # type: ignore[arg-type]
        return LocalFunctionService(spec, [sys.executable, str(script)], child_env({}), tmp_path, {"job": "t", "namespace": "n"})

    return make


async def _post(service: LocalFunctionService) -> int:
    status, _, body = await service.forward("POST", "/", {}, b"x")
    assert status == 200, body
    return int(body)


async def test_scales_from_zero_and_within_concurrency(service_factory) -> None:
    service = service_factory(max_scale=2, container_concurrency=1)
    await service.start()
    try:
        assert service.running == 0
        pids = await asyncio.gather(*(_post(service) for _ in range(6)))
        assert len(set(pids)) == 2  # two instances, never more than max_scale
        assert service.stats.cold_starts == 2 and service.stats.max_instances == 2
        assert len(service.stats.cold_start_seconds) == 2 and min(service.stats.cold_start_seconds) >= 0.2
    finally:
        await service.stop()
    assert service.running == 0


async def test_idle_instances_scale_to_zero_and_come_back(service_factory) -> None:
    service = service_factory(max_scale=1, idle_seconds=0.5)
    await service.start()
    try:
        first = await _post(service)
        for _ in range(40):
            if service.running == 0:
                break
            await asyncio.sleep(0.1)
        assert service.running == 0 and service.stats.scale_to_zero == 1
        second = await _post(service)
        assert second != first and service.stats.cold_starts == 2
    finally:
        await service.stop()


async def test_min_scale_keeps_instances_warm(service_factory) -> None:
    service = service_factory(min_scale=1, max_scale=1, idle_seconds=0.2)
    await service.start()
    try:
        assert service.running == 1
        await _post(service)
        await asyncio.sleep(0.8)
        assert service.running == 1 and service.stats.scale_to_zero == 0
    finally:
        await service.stop()


async def test_a_killed_instance_is_replaced(service_factory) -> None:
    service = service_factory(max_scale=1)
    await service.start()
    try:
        first = await _post(service)
        assert service.kill_one() == first
        await asyncio.sleep(0.2)
        second = await _post(service)
        assert second != first and service.stats.crashed == 1
    finally:
        await service.stop()
