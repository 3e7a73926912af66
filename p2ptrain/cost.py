"""What a job uses and what that costs: the per-peer ledger, the job's totals and the price list.

Each peer keeps a ``PeerCost`` ledger: gradient function invocations (every attempt, as platforms bill
them), the function's CPU and wall seconds and GB-seconds (from the ``cost`` field of its replies, so
nothing is scraped), cold starts, the peer's and its Redis's pod-seconds, and the bytes it moves
between peers and to and from Redis. The ledger feeds the Prometheus counters and the ``cost`` block
of the peer's ``/status``; ``job_cost`` sums the peers' blocks (the local runner's summary, the
operator's ``status.cost``) and ``Prices`` turns the totals into money.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from p2ptrain import metrics, wire

# GB-seconds and GB transferred are billed in binary gigabytes (AWS Lambda: 1024 MB = 1 GB).
GB = float(1 << 30)
REDIS_INFO_SECONDS = 1.0  # how often a peer asks its Redis for its uptime (INFO counts whole seconds)
PEER_PATHS = ("exchangeSent", "exchangeReceived", "datarefFetched", "outboxFetched")
REDIS_PATHS = ("modelPublished", "modelRead", "accumulatorWritten", "meanRead", "outboxWritten", "checkpointWritten",
               "checkpointRead")
_METRIC_PATH = dict(zip(PEER_PATHS + REDIS_PATHS, metrics.PEER_BYTE_PATHS + metrics.REDIS_BYTE_PATHS, strict=True))
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SUFFIX = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


class CostError(ValueError):
    """A price list or a cost block that cannot be used; the message names the field at fault."""


def empty_cost() -> dict[str, Any]:
    """A cost block with every figure at zero (the shape of ``status.cost``)."""
    return {
        "functionInvocations": 0,
        "functionCpuSeconds": 0.0,
        "functionWallSeconds": 0.0,
        "functionGbSeconds": 0.0,
        "functionMemorySource": "",
        "functionColdStarts": 0,
        "peerPodSeconds": 0.0,
        "redisPodSeconds": 0.0,
        "peerBytes": dict.fromkeys(PEER_PATHS, 0),
        "redisBytes": dict.fromkeys(REDIS_PATHS, 0),
    }


def memory_bytes(resources: Mapping[str, Any] | None) -> int | None:
    """The function's memory limit (else request) from ``spec.function.resources``, in bytes; None if unset."""
    for kind in ("limits", "requests"):
        value = ((resources or {}).get(kind) or {}).get("memory")
        if value is not None:
            match = _QUANTITY.match(str(value))
            if match is None:
                raise CostError(f"function.resources.{kind}.memory={value!r} is not a memory quantity such as 512Mi")
            return int(float(match.group(1)) * _SUFFIX[match.group(2)])
    return None


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


def job_cost(blocks: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The job's totals: the peers' cost blocks summed (a peer without one adds nothing)."""
    total = empty_cost()
    sources: set[str] = set()
    for block in blocks:
        if not block:
            continue
        for key, value in block.items():
            if key in ("peerBytes", "redisBytes"):
                for path, n in value.items():
                    if path in total[key]:
                        total[key][path] += int(n)
            elif key == "functionMemorySource":
                sources.add(str(value))
            elif key in total:
                total[key] += value
    total["functionMemorySource"] = "/".join(sorted(s for s in sources if s))
    for key in ("functionCpuSeconds", "functionWallSeconds", "functionGbSeconds", "peerPodSeconds", "redisPodSeconds"):
        total[key] = round(float(total[key]), 6)
    return total


# --- prices ----------------------------------------------------------------------------------------
_PRICE_FIELDS = {
    "function": ("perGbSecond", "perMillionInvocations", "perVcpuHour"),
    "pods": ("perVcpuHour", "vcpusPerPod"),
    "transfer": ("perGb",),
}
_LABEL_FIELDS = ("date", "source", "currency")


@dataclass(frozen=True)
class Prices:
    """A price list (``--prices prices.yaml``); every price is per unit in ``currency``."""

    date: str
    source: str
    currency: str
    function_per_gb_second: float = 0.0
    function_per_million_invocations: float = 0.0
    function_per_vcpu_hour: float = 0.0
    pods_per_vcpu_hour: float = 0.0
    vcpus_per_pod: float = 1.0
    transfer_per_gb: float = 0.0

    def price(self, cost: Mapping[str, Any]) -> dict[str, Any]:
        """Money for a cost block (``job_cost``'s shape), item by item and in total."""
        transferred = sum(cost["peerBytes"].values()) + sum(cost["redisBytes"].values())
        pod_seconds = float(cost["peerPodSeconds"]) + float(cost["redisPodSeconds"])
        items = {
            "functionMemory": cost["functionGbSeconds"] * self.function_per_gb_second,
            "functionInvocations": cost["functionInvocations"] / 1e6 * self.function_per_million_invocations,
            "functionCpu": cost["functionCpuSeconds"] / 3600 * self.function_per_vcpu_hour,
            "pods": pod_seconds / 3600 * self.vcpus_per_pod * self.pods_per_vcpu_hour,
            "transfer": transferred / GB * self.transfer_per_gb,
        }
        return {"currency": self.currency, "pricesDate": self.date, "items": items, "total": sum(items.values())}


def parse_prices(data: Any, where: str = "prices") -> Prices:
    """A validated price list; ``CostError`` names the field at fault and what was expected."""
    if not isinstance(data, Mapping):
        raise CostError(f"{where}: expected a mapping with {', '.join(_LABEL_FIELDS)} and "
                        f"{', '.join(_PRICE_FIELDS)} sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_LABEL_FIELDS) - set(_PRICE_FIELDS) - {"kind", "notes"})
    if unknown:
        raise CostError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join((*_LABEL_FIELDS, *_PRICE_FIELDS))}")
    labels: dict[str, str] = {}
    for name in _LABEL_FIELDS:
        value = data.get(name)
        if not isinstance(value, str | int) or not str(value).strip():
            raise CostError(f"{where}: {name} is required (a non-empty string, e.g. date: \"2026-11\")")
        labels[name] = str(value)
    values: dict[str, float] = {}
    for section, fields in _PRICE_FIELDS.items():
        block = data.get(section, {})
        if not isinstance(block, Mapping):
            raise CostError(f"{where}: {section} must be a mapping of {', '.join(fields)}, got {type(block).__name__}")
        extra = sorted(set(block) - set(fields))
        if extra:
            raise CostError(f"{where}: unknown field {section}.{extra[0]}; expected {', '.join(fields)}")
        for name, value in block.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CostError(f"{where}: {section}.{name} must be a non-negative number, got {value!r}")
            values[f"{section}_{_snake(name)}"] = float(value)
    if not any(v for k, v in values.items() if k != "pods_vcpus_per_pod"):
        raise CostError(f"{where}: no price is set: give at least one of function.*, pods.perVcpuHour, transfer.perGb")
    return Prices(
        date=labels["date"], source=labels["source"], currency=labels["currency"],
        function_per_gb_second=values.get("function_per_gb_second", 0.0),
        function_per_million_invocations=values.get("function_per_million_invocations", 0.0),
        function_per_vcpu_hour=values.get("function_per_vcpu_hour", 0.0),
        pods_per_vcpu_hour=values.get("pods_per_vcpu_hour", 0.0),
        vcpus_per_pod=values.get("pods_vcpus_per_pod", 1.0),
        transfer_per_gb=values.get("transfer_per_gb", 0.0),
    )


def load_prices(path: Path) -> Prices:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CostError(f"cannot read the price list {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CostError(f"{path}: not valid YAML: {exc}") from exc
    return parse_prices(data, str(path))


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def cost_of(document: Any, where: str) -> dict[str, Any]:
    """The cost block in a run summary (``cost``), a P2PTrainingJob (``status.cost``) or a peer status."""
    if isinstance(document, Mapping):
        for block in (document.get("cost"), (document.get("status") or {}).get("cost")):
            if isinstance(block, Mapping) and "functionInvocations" in block:
                return job_cost([block])
    raise CostError(f"{where}: no cost block found: expected a `p2ptrain run --summary` file (cost), "
                    "a P2PTrainingJob as `kubectl get p2pjob NAME -o json` prints it (status.cost) or a peer's /status")


def format_cost(cost: Mapping[str, Any], money: Mapping[str, Any] | None = None) -> list[str]:
    """The summary's cost lines."""
    memory = {"spec": "memory from spec.function.resources", "measured": "memory = measured peak RSS"}.get(
        cost["functionMemorySource"], f"memory: {cost['functionMemorySource'] or 'n/a'}")
    peer_bytes, redis_bytes = cost["peerBytes"], cost["redisBytes"]
    lines = [
        f"  cost          function: {cost['functionInvocations']} invocations, {cost['functionCpuSeconds']:.2f} CPU-s, "
        f"{cost['functionWallSeconds']:.2f} s, {cost['functionGbSeconds']:.4f} GB-s ({memory}), "
        f"{cost['functionColdStarts']} cold starts",
        f"                pods: peers {cost['peerPodSeconds']:.1f} s, Redis {cost['redisPodSeconds']:.1f} s; "
        f"bytes between peers {sum(peer_bytes.values()):,}, to/from Redis {sum(redis_bytes.values()):,}",
    ]
    if money is not None:
        items = ", ".join(f"{k} {v:.6f}" for k, v in money["items"].items())
        lines.append(f"                {money['total']:.6f} {money['currency']} at {money['pricesDate']} prices ({items})")
    return lines


def tensor_blob_bytes(numel: int) -> int:
    """Bytes of a float32 tensor as ``wire.encode_tensor`` writes it (header + payload)."""
    return wire.TENSOR_HEADER_BYTES + 4 * numel
