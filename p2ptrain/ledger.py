"""One peer's ledger of what it uses (``PeerCost``): the cost block of its ``/status`` and the
``p2ptrain_cost_*`` counters, kept up to date as the peer trains.

The ledger counts gradient function invocations (every attempt, as platforms bill them), the
function's CPU and wall seconds and GB-seconds (from the ``cost`` field of its replies, so nothing is
scraped), cold starts, the peer's and its Redis's pod-seconds, and the bytes it moves between peers
and to and from Redis. The block's shape, the job's totals and the prices live in ``p2ptrain.cost``,
which stays free of the training stack for the operator.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from p2ptrain import metrics, wire
from p2ptrain.cost import GB, PEER_PATHS, REDIS_PATHS, empty_cost

REDIS_INFO_SECONDS = 1.0  # how often a peer asks its Redis for its uptime (INFO counts whole seconds)
_METRIC_PATH = dict(zip(PEER_PATHS + REDIS_PATHS, metrics.PEER_BYTE_PATHS + metrics.REDIS_BYTE_PATHS, strict=True))


class PeerCost:
    """One peer's ledger. It writes into ``into`` (the status's cost block, served at ``/status``) and
    the labelled Prometheus counters; the function's memory comes from the spec when set (what a
    platform bills), else from each reply's measured peak RSS."""

    def __init__(self, labels: dict[str, str], into: dict[str, Any], spec_memory_bytes: int | None) -> None:
        self.labels = labels
        self.figures = into
        self.figures.update(empty_cost())
        self.figures["functionMemorySource"] = "spec" if spec_memory_bytes else "measured"
        self.spec_memory_bytes = spec_memory_bytes
        # A pod is billed from its start: the peer's process started before the ledger (torch, data).
        self._started = time.monotonic() - (process_age_seconds() or 0.0)
        self._redis_uptime: int | None = None
        self._redis_asked: float | None = None  # monotonic time of the last INFO
        self._asking: asyncio.Future[None] | None = None  # the INFO in flight (tick_after_round)
        self._lock = threading.Lock()  # parts record from the event loop and from worker threads

    def invoked(self) -> None:
        """One gradient function call attempt (billed whether or not it succeeds)."""
        with self._lock:
            self.figures["functionInvocations"] += 1
        metrics.child(metrics.COST_FUNCTION_INVOCATIONS_TOTAL, **self.labels).inc()

    def computed(self, reply_cost: Mapping[str, Any], cold: bool) -> None:
        """A successful reply: its CPU and wall seconds, GB-seconds and the Redis bytes it moved."""
        cpu = float(reply_cost.get("cpuSeconds", 0.0))
        wall = float(reply_cost.get("wallSeconds", 0.0))
        memory = self.spec_memory_bytes or int(reply_cost.get("memoryBytes", 0))
        f = self.figures
        with self._lock:
            f["functionCpuSeconds"] += cpu
            f["functionWallSeconds"] += wall
            f["functionGbSeconds"] += memory / GB * wall
            f["functionColdStarts"] += int(cold)
        metrics.child(metrics.COST_FUNCTION_CPU_SECONDS_TOTAL, **self.labels).inc(cpu)
        metrics.child(metrics.COST_FUNCTION_WALL_SECONDS_TOTAL, **self.labels).inc(wall)
        metrics.child(metrics.COST_FUNCTION_MEMORY_BYTE_SECONDS_TOTAL, **self.labels).inc(memory * wall)
        if cold:
            metrics.COST_FUNCTION_COLD_STARTS_TOTAL.labels(**self.labels).inc()
        self.redis_bytes("modelRead", int(reply_cost.get("modelReadBytes", 0)))
        self.redis_bytes("accumulatorWritten", int(reply_cost.get("accumulatorWriteBytes", 0)))

    def peer_bytes(self, path: str, n: int) -> None:
        """Bytes moved between peers (``PEER_PATHS``)."""
        with self._lock:
            self.figures["peerBytes"][path] += n
        metrics.child(metrics.COST_PEER_BYTES_TOTAL, **self.labels, path=_METRIC_PATH[path]).inc(n)

    def redis_bytes(self, path: str, n: int) -> None:
        """Bytes moved to or from Redis (``REDIS_PATHS``)."""
        with self._lock:
            self.figures["redisBytes"][path] += n
        metrics.child(metrics.COST_REDIS_BYTES_TOTAL, **self.labels, path=_METRIC_PATH[path]).inc(n)

    def redis_due(self, last: bool = False) -> bool:
        """Whether ``tick_redis`` should ask Redis again: INFO's uptime counts whole seconds, so asking
        more than once a second adds nothing but a round trip and a thread hop to every short round.
        ``last``: the run's last round, whose figures must be complete."""
        asked = self._redis_asked
        return last or asked is None or time.monotonic() - asked >= REDIS_INFO_SECONDS

    async def tick_after_round(self, client: redis.Redis, *, last: bool) -> None:
        """Bring the pod-seconds up to now at the end of a round: the peer's always, its Redis's when
        ``redis_due`` (otherwise at the next INFO, at most a second later). The INFO runs in a worker
        thread behind the next round, one at a time; the run's last round waits for its own."""
        asking = self._asking
        if asking is not None and not asking.done():
            if not last:
                self.tick(None)
                return
            await asking
        if not self.redis_due(last):
            self.tick(None)
            return
        self._asking = asyncio.ensure_future(asyncio.to_thread(self.tick_redis, client))
        if last:
            await self._asking

    def tick_redis(self, client: redis.Redis) -> None:
        """``tick`` with the uptime of this peer's Redis (blocking: call it from a worker thread)."""
        self._redis_asked = time.monotonic()
        try:
            uptime = int(client.info("server")["uptime_in_seconds"])
        except (redis.RedisError, KeyError, ValueError):
            uptime = None  # counted at the next round
        self.tick(uptime)

    def tick(self, redis_uptime_seconds: int | None) -> None:
        """Bring the pod-seconds up to now: this peer's since it started, its Redis's from ``INFO``
        uptime (a Redis that restarted counts again from its new start)."""
        now = time.monotonic() - self._started
        with self._lock:
            added = now - self.figures["peerPodSeconds"]
            self.figures["peerPodSeconds"] = now
        metrics.child(metrics.COST_POD_SECONDS_TOTAL, **self.labels, component="peer").inc(max(0.0, added))
        if redis_uptime_seconds is None:
            return
        before = self._redis_uptime
        step = redis_uptime_seconds if before is None or redis_uptime_seconds < before else redis_uptime_seconds - before
        self._redis_uptime = redis_uptime_seconds
        with self._lock:
            self.figures["redisPodSeconds"] += step
        metrics.COST_POD_SECONDS_TOTAL.labels(**self.labels, component="redis").inc(step)


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where that cannot be read."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


def tensor_blob_bytes(numel: int) -> int:
    """Bytes of a float32 tensor as ``wire.encode_tensor`` writes it (header + payload)."""
    return wire.TENSOR_HEADER_BYTES + 4 * numel
