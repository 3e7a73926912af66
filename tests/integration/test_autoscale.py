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

from .harness import wait_until

SERVER = textwrap.dedent(
    """
    import os, signal, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if os.environ.get("IGNORE_TERM"):  # an instance slow to stop: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

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

    def make(env: dict[str, str] | None = None, **scale: float) -> LocalFunctionService:
        """A service; each test stops it in its own event loop (``finally: await service.stop()``)."""
        spec = FunctionSpec(**{"max_scale": 2, "container_concurrency": 1, "idle_seconds": 30, **scale})  # type: ignore[arg-type]
        return LocalFunctionService(
            spec, [sys.executable, str(script)], child_env(env or {}), tmp_path, {"job": "t", "namespace": "n"}
        )

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
        await wait_until(lambda: service.running == 0, timeout=10)
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
        await wait_until(lambda: not _alive(first), timeout=10)
        second = await _post(service)
        assert second != first and service.stats.crashed == 1
    finally:
        await service.stop()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_stopping_an_idle_instance_holds_up_no_request(service_factory) -> None:
    """An idle instance that ignores SIGTERM takes the reaper its whole grace period to stop. A request
    meanwhile starts a new instance and is served while the old process still lives: the reaper waits
    for it in a worker thread, outside the service's lock, not on the event loop."""
    service = service_factory(max_scale=1, idle_seconds=0.3, env={"IGNORE_TERM": "1"})
    await service.start()
    try:
        first = await _post(service)
        await wait_until(lambda: service.stats.scale_to_zero == 1, timeout=10)
        assert service.stats.scale_to_zero == 1 and _alive(first)
        second = await _post(service)
        assert second != first
        assert _alive(first), "the request was held until the old instance had ended"
    finally:
        await service.stop()
    assert not _alive(first) and not _alive(second)


@pytest.mark.parametrize(("concurrency", "instances_used"), [(2, 1), (4, 2)])
async def test_requests_are_routed_as_knatives_activator_routes_them(service_factory, concurrency, instances_used) -> None:
    """Two requests at once, two warm instances: with containerConcurrency 1-3 both go to the first
    instance with a free slot (a peer's micro-batches share one read of the model), above 3 round robin
    spreads them."""
    service = service_factory(min_scale=2, max_scale=2, container_concurrency=concurrency)
    await service.start()
    try:
        assert service.running == 2
        pids = await asyncio.gather(_post(service), _post(service))
        assert len(set(pids)) == instances_used
    finally:
        await service.stop()
