"""A local stand-in for a Knative Service: function instances that scale from and to zero.

An HTTP front door (like Knative's activator) holds each request until an instance has a free slot
(``containerConcurrency``), starts a new instance process when all are busy and fewer than
``maxScale`` run (a cold start, timed and counted), and stops instances idle for ``idleSeconds``
(scale to zero). A crashed instance is dropped and its request answered 503, which the peer retries.
A request goes where Knative's activator would send it (:func:`pick`): the first instance with a free
slot for ``containerConcurrency`` 1 to 3, round robin over those with a free slot above 3, the less busy
of two at random for 0 (unlimited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain import asgi
from p2ptrain.poster import Poster, PostError
from p2ptrain.redis_server import die_with_parent, free_port
from p2ptrain.spec import FunctionSpec

log = logging.getLogger(__name__)

Scope = asgi.Scope
Receive = asgi.Receive
Send = asgi.Send

_READY_TIMEOUT_SECONDS = 120.0
# Gradient requests are JSON lists of sample indices: far below this; anything bigger is refused.
_MAX_BODY_BYTES = 64 * 1024 * 1024
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


@dataclass
class Instance:
    number: int
    port: int
    process: subprocess.Popen[bytes]
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    failed: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return not self.failed and self.process.poll() is None


@dataclass
class ScaleStats:
    cold_starts: int = 0
    cold_start_seconds: list[float] = field(default_factory=list)
    scale_to_zero: int = 0
    crashed: int = 0
    max_instances: int = 0
    requests: int = 0
    warm_request_seconds: list[float] = field(default_factory=list)
    cold_request_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {
            "cold_starts": self.cold_starts,
            "cold_start_seconds_mean": mean(self.cold_start_seconds),
            "scaled_to_zero": self.scale_to_zero,
            "crashed_instances": self.crashed,
            "max_instances": self.max_instances,
            "requests": self.requests,
            "warm_request_seconds_mean": mean(self.warm_request_seconds),
            **{f"warm_request_seconds_{name}": value for name, value in spread(self.warm_request_seconds).items()},
            "cold_request_seconds_mean": mean(self.cold_request_seconds),
        }


def spread(values: list[float]) -> dict[str, float | None]:
    """Median, 10th and 90th percentile (None without values): a warm request's typical cost and its tails."""
    if not values:
        return {"median": None, "p10": None, "p90": None}
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def pick(container_concurrency: int, ready: Sequence[Instance], capacity: int, next_index: int) -> tuple[Instance | None, int]:
    """The instance a request goes to, of ``ready`` (in start order), and the round-robin index after it.

    Knative's activator picks by ``containerConcurrency`` (serving pkg/activator/net/throttler.go):
    0, the less busy of two instances drawn at random; 1 to 3, the first with a free slot; above 3,
    round robin over those with a free slot. The first-free rule sends the micro-batches a peer sends at
    once to the same instance, so it reads their model version once (``gradient.VersionCache``)."""
    free = [i for i in ready if i.inflight < capacity]
    if not free:
        return None, next_index
    if container_concurrency == 0:
        drawn = random.sample(free, 2) if len(free) > 1 else free
        return min(drawn, key=lambda i: i.inflight), next_index
    if container_concurrency <= 3:
        return free[0], next_index
    n = len(ready)
    position = next((next_index + step) % n for step in range(n) if ready[(next_index + step) % n].inflight < capacity)
    return ready[position], (position + 1) % n


class LocalFunctionService:
    def __init__(
        self,
        scale: FunctionSpec,
        command: Sequence[str],
        env: dict[str, str],
        log_dir: Path,
        labels: dict[str, str],
    ) -> None:
        self.scale = scale
        self.command = list(command)
        self.env = env
        self.log_dir = log_dir
        self.labels = labels
        self.instances: list[Instance] = []
        self.stats = ScaleStats()
        self._changed = asyncio.Condition()
        self._numbers = 0
        self._client = Poster(max_connections=256, timeout_seconds=scale.timeout_seconds)
        self._reaper: asyncio.Task[None] | None = None
        self._waiters = 0
        self._round_robin = 0  # containerConcurrency > 3: where the next request starts looking
        self._warming: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()  # instances being terminated off the loop

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        for _ in range(self.scale.min_scale):
            await self._spawn()
        self._reaper = asyncio.create_task(self._reap_forever())

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every instance: SIGTERM, and SIGKILL after ``grace`` seconds."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        warming = list(self._warming)
        for task in warming:
            task.cancel()
        stopping = [asyncio.to_thread(terminate, i.process, grace) for i in self.instances]
        self.instances.clear()
        await asyncio.gather(*warming, *stopping, *self._stopping, return_exceptions=True)
        await self._client.aclose()

    def kill_one(self) -> int | None:
        """Kill a running instance (SIGKILL) — for failure drills; returns its pid."""
        for instance in self.instances:
            if instance.alive:
                instance.process.kill()
                return instance.process.pid
        return None

    # --- the front door -----------------------------------------------------------------------------
    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        body = await asgi.read_body(receive, _MAX_BODY_BYTES)
        if body is None:
            await asgi.respond(send, 413, f"request body exceeds {_MAX_BODY_BYTES} bytes".encode(), reason="oversize")
            return
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _HOP_HEADERS
        }
        status, out_headers, content = await self.forward(scope["method"], scope["path"], headers, body)
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})

    async def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started = time.monotonic()
        self.stats.requests += 1
        try:
            instance, cold = await asyncio.wait_for(self._acquire(), timeout=self.scale.timeout_seconds)
        except TimeoutError:
            return 503, [(b"content-type", b"text/plain")], b"no function instance became available in time"
        try:
            response = await self._client.request(method, instance.url + path, headers=headers, content=body)
        except PostError as exc:
            instance.failed = instance.process.poll() is not None or exc.connect
            return 503, [(b"content-type", b"text/plain")], f"function instance failed: {exc}".encode()
        finally:
            await self._release(instance)
        elapsed = time.monotonic() - started
        (self.stats.cold_request_seconds if cold else self.stats.warm_request_seconds).append(elapsed)
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower() not in _HOP_HEADERS and k.lower() != "content-encoding"
        ]
        out.append((b"content-length", str(len(response.content)).encode()))
        return response.status, out, response.content

    # --- scaling ------------------------------------------------------------------------------------
    def _capacity(self) -> int:
        return self.scale.container_concurrency or 1_000_000

    async def _acquire(self) -> tuple[Instance, bool]:
        """A slot on a ready instance; starts an instance when all are busy (scale from zero / out)."""
        cold = False
        async with self._changed:
            while True:
                self._drop_dead()
                ready = [i for i in self.instances if i.ready.is_set()]
                chosen, self._round_robin = pick(self.scale.container_concurrency, ready, self._capacity(),
                                                 self._round_robin)
                if chosen is not None:
                    instance = chosen
                    instance.inflight += 1
                    instance.last_used = time.monotonic()
                    return instance, cold
                starting = [i for i in self.instances if not i.ready.is_set()]
                # Waiting for an instance that is starting makes this request pay for a cold start too.
                cold = cold or bool(starting)
                waiting_capacity = len(starting) * self._capacity()
                if len(self.instances) < self.scale.max_scale and waiting_capacity <= self._waiters:
                    cold = True
                    instance = self._start_instance()
                    self._warming.add(asyncio.create_task(self._become_ready(instance)))
                self._waiters += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiters -= 1

    async def _release(self, instance: Instance) -> None:
        async with self._changed:
            instance.inflight -= 1
            instance.last_used = time.monotonic()
            self._changed.notify_all()

    async def _spawn(self) -> None:
        async with self._changed:
            instance = self._start_instance()
        await self._become_ready(instance)

    def _start_instance(self) -> Instance:
        """Start an instance process (call with the condition held, so no two requests over-spawn)."""
        self._numbers += 1
        port = free_port()
        log_path = self.log_dir / f"function-{self._numbers}.log"
        env = {**self.env, "LISTEN_ADDRESS": f"127.0.0.1:{port}"}
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                self.command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the runner, which stops instances in order
            )
        instance = Instance(number=self._numbers, port=port, process=process, started=time.monotonic())
        self.instances.append(instance)
        return instance

    async def _become_ready(self, instance: Instance) -> None:
        ok = await self._wait_ready(instance)
        async with self._changed:
            if ok:
                instance.ready.set()
                instance.last_used = time.monotonic()
                self.stats.cold_starts += 1
                # Counted among ready instances, like cold starts: one that never served is neither.
                self.stats.max_instances = max(self.stats.max_instances, self.serving)
                self.stats.cold_start_seconds.append(time.monotonic() - instance.started)
                log.info("function instance %d ready in %.2fs", instance.number, time.monotonic() - instance.started)
            else:
                instance.failed = True
                log.warning("function instance %d did not become ready; see its log", instance.number)
            self._changed.notify_all()
        task = asyncio.current_task()
        if task is not None:
            self._warming.discard(task)

    async def _wait_ready(self, instance: Instance) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline and instance.process.poll() is None:
            with contextlib.suppress(PostError):
                response = await self._client.get(instance.url + "/health/readiness", timeout=1)
                if response.status == 200:
                    return True
            await asyncio.sleep(0.05)
        return False

    def _drop_dead(self) -> None:
        """Forget instances whose process ended (call with the condition held; never blocks)."""
        for instance in [i for i in self.instances if not i.alive and (i.ready.is_set() or i.failed)]:
            self.instances.remove(instance)
            self.stats.crashed += 1
            if instance.process.poll() is None:  # marked failed but still running: it must not linger
                instance.process.kill()
            self._reap_later(instance.process)
            log.warning("function instance %d is gone (exit code %s)", instance.number, instance.process.returncode)

    def _reap_later(self, process: subprocess.Popen[bytes]) -> None:
        """Stop and wait for a process in a worker thread, outside the condition and off the loop."""
        task = asyncio.create_task(asyncio.to_thread(terminate, process))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, max(0.05, self.scale.idle_seconds / 4)))
            async with self._changed:
                self._drop_dead()
                now = time.monotonic()
                idle = [
                    i
                    for i in self.instances
                    if i.ready.is_set() and i.inflight == 0 and now - i.last_used >= self.scale.idle_seconds
                ]
                keep = max(0, len(self.instances) - self.scale.min_scale)
                for instance in idle[:keep]:
                    self.instances.remove(instance)
                    self.stats.scale_to_zero += 1
                    self._reap_later(instance.process)
                    log.info("function instance %d idle for %.0fs: stopped", instance.number, self.scale.idle_seconds)
                self._changed.notify_all()

    @property
    def running(self) -> int:
        return sum(1 for i in self.instances if i.alive)

    @property
    def serving(self) -> int:
        """Instances that are up and ready (what ``stats.max_instances`` counts the most of)."""
        return sum(1 for i in self.instances if i.alive and i.ready.is_set())


def terminate(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after ``timeout`` seconds; waits for it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for child processes: ours, plus ``extra``; one torch thread each."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env
