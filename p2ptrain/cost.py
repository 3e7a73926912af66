"""What a job used and what that costs: the cost block's shape, the job's totals and the price list.

A cost block counts gradient function invocations (every attempt, as platforms bill them), the
function's CPU and wall seconds and GB-seconds, cold starts, the peers' and their Redis's pod-seconds,
and the bytes moved between peers and to and from Redis. Each peer fills its own block as it trains
(``p2ptrain.ledger.PeerCost``, served in the ``cost`` block of its ``/status``); ``job_cost`` sums
the peers' blocks (the local runner's summary, the operator's ``status.cost``) and ``Prices`` turns
the totals into money.

This module is plain data in, data out: the operator imports it, so it must never import the
training stack (torch, numpy, Redis; tests/unit/test_operator_imports.py checks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# GB-seconds and GB transferred are billed in binary gigabytes (AWS Lambda: 1024 MB = 1 GB).
GB = float(1 << 30)
PEER_PATHS = ("exchangeSent", "exchangeReceived", "datarefFetched", "outboxFetched")
REDIS_PATHS = ("modelPublished", "modelRead", "accumulatorWritten", "meanRead", "outboxWritten", "checkpointWritten",
               "checkpointRead")
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
