"""In-database gradient accumulation: the Python side of ``P2P.ACCUM`` / ``P2P.MEAN`` / ``P2P.MEANSTORE``.

Functions add a micro-batch gradient (weighted by its sample count) into the peer's accumulator with
one atomic, idempotent command; the peer reads the weighted mean with one call. The commands come
from the p2ptrain Redis module (native speed) or, where modules cannot be loaded, from a Redis 7 Lua
function library with the same semantics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import numpy as np
import redis

log = logging.getLogger(__name__)

# How long round-scoped keys (model versions, accumulators, outbox) live: long enough for a slow
# peer to fetch a dataref or a late function to finish, short enough not to pile up.
ROUND_KEY_TTL_SECONDS = 600

MODULE_NAME = "p2ptrain"
LIBRARY_NAME = "p2ptrain"


class AccumulatorError(RuntimeError):
    """Redis refused an accumulation (shape mismatch, non-finite values, bad weight) or lacks the commands."""


def lua_library() -> str:
    return resources.files("p2ptrain").joinpath("accumulate.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Accumulator:
    kind: Literal["module", "lua"]

    def add(
        self, client: redis.Redis, acc_key: str, meta_key: str, part: str, weight: float, blob: bytes | memoryview,
        *, ttl_seconds: int = ROUND_KEY_TTL_SECONDS,
    ) -> bool:
        """Add ``weight * blob`` (raw float32) once per ``part``; False when ``part`` was already added.

        Both keys get ``ttl_seconds`` on every add: a function call that arrives after the peer cleared
        the round recreates them, and they must expire rather than stay forever.
        """
        # One command: the add and both TTLs (a function call pays for each round trip, and for each
        # command redis-py packs: a three-command pipeline cost 0.1 ms more here).
        args = (part, repr(float(weight)), blob, "EX", ttl_seconds)
        try:
            if self.kind == "module":
                reply = client.execute_command("P2P.ACCUM", acc_key, meta_key, *args)
            else:  # loads the library first if Redis restarted empty
                reply = _fcall(client, "p2p_accum", acc_key, meta_key, *args)
        except redis.ResponseError as exc:
            raise AccumulatorError(f"accumulating into {acc_key} failed: {exc}") from exc
        return bool(reply)

    def mean(self, client: redis.Redis, acc_key: str, meta_key: str) -> tuple[np.ndarray, float, int] | None:
        """(weighted mean as float32, total weight, parts) or None when nothing was accumulated."""
        return self._read_mean(client, acc_key, meta_key, clear=False)

    def take_mean(
        self, client: redis.Redis, acc_key: str, meta_key: str, *, store: str | None = None,
        ttl_seconds: int = ROUND_KEY_TTL_SECONDS, delete: tuple[str, ...] = (),
    ) -> tuple[np.ndarray, float, int] | None:
        """``mean``, and both keys deleted, in one round trip (the peer reads a round's mean once).

        ``store``: the mean is also written there as a ``p2ptrain.wire`` tensor with ``ttl_seconds``
        (``P2P.MEANSTORE``), where a peer parks the average it sends, without sending it back to Redis.
        ``delete``: more keys deleted in the same round trip."""
        return self._read_mean(client, acc_key, meta_key, clear=True, store=store, ttl_seconds=ttl_seconds,
                               delete=delete)

    def _read_mean(
        self, client: redis.Redis, acc_key: str, meta_key: str, *, clear: bool, store: str | None = None,
        ttl_seconds: int = ROUND_KEY_TTL_SECONDS, delete: tuple[str, ...] = (),
    ) -> tuple[np.ndarray, float, int] | None:
        pipe = client.pipeline(transaction=False)
        if store is not None and self.kind == "module":
            pipe.execute_command("P2P.MEANSTORE", acc_key, meta_key, store, "EX", ttl_seconds)
        elif store is not None:
            pipe.fcall("p2p_meanstore", 3, acc_key, meta_key, store, "EX", ttl_seconds)
        elif self.kind == "module":
            pipe.execute_command("P2P.MEAN", acc_key, meta_key)
        else:
            pipe.fcall("p2p_mean", 2, acc_key, meta_key)
        if clear:
            pipe.delete(acc_key, meta_key)
        if delete:
            pipe.delete(*delete)
        reply = pipe.execute(raise_on_error=False)[0]
        if isinstance(reply, redis.ResponseError) and self.kind == "lua" and _missing_function(reply):
            return None  # Redis restarted empty (the library with it): nothing was accumulated there
        if isinstance(reply, redis.ResponseError):
            raise AccumulatorError(f"reading the mean of {acc_key} failed: {reply}")
        return _as_mean(reply)


def _as_mean(reply: Any) -> tuple[np.ndarray, float, int] | None:
    if not reply:
        return None
    blob, total, parts = reply
    mean = np.frombuffer(blob, dtype="<f4")
    if not (isinstance(blob, bytearray) and mean.dtype == np.float32):  # a large one is ours already
        mean = mean.astype(np.float32)
    return mean, float(total), int(parts)


def _fcall(client: redis.Redis, function: str, acc_key: str, meta_key: str, *args: object) -> Any:
    """FCALL, loading the library first if this server does not have it (it restarted empty)."""
    try:
        return client.fcall(function, 2, acc_key, meta_key, *args)
    except redis.ResponseError as exc:
        if not _missing_function(exc):
            raise
    client.function_load(lua_library(), replace=True)
    return client.fcall(function, 2, acc_key, meta_key, *args)


def _missing_function(error: redis.ResponseError) -> bool:
    return "function not found" in str(error).lower()


def detect(client: redis.Redis, mode: str = "auto") -> Accumulator:
    """The accumulator this server supports: the module if loaded (``auto``/``module``), else Lua."""
    if mode not in ("auto", "module", "lua"):
        raise AccumulatorError(f"accumulator mode must be auto, module or lua, got {mode!r}")
    if mode != "lua":
        modules = client.execute_command("MODULE", "LIST")
        names = {_module_name(m) for m in modules}
        if MODULE_NAME in names:
            return Accumulator("module")
        if mode == "module":
            raise AccumulatorError(
                "redis.accumulator=module but the p2ptrain module is not loaded in this Redis "
                "(start redis-server with --loadmodule $(p2ptrain redis-module))"
            )
    try:
        client.function_load(lua_library(), replace=True)
    except redis.ResponseError as exc:
        raise AccumulatorError(f"cannot load the p2ptrain Lua function library: {exc}") from exc
    return Accumulator("lua")


def _module_name(entry: object) -> str:
    if isinstance(entry, dict):
        name = entry.get(b"name", entry.get("name", b""))
    else:  # RESP2: flat [b"name", b"p2ptrain", b"ver", 1, ...]
        items = list(entry)  # type: ignore[call-overload]
        name = items[items.index(b"name") + 1] if b"name" in items else b""
    return name.decode() if isinstance(name, bytes) else str(name)
