"""In-database model update (SPIRT's ``AI.ModelUpdate``): one optimizer step where the model lives.

``P2P.SGD`` / ``P2P.ADAM`` (the p2ptrain module, or the same commands as Lua functions) read model
version *v* (a :mod:`p2ptrain.wire` tensor), apply the aggregated gradient with exactly
``torch.optim.SGD`` / ``torch.optim.Adam`` semantics and write version *v + 1* beside it, so the
gradient functions read the new version without the peer re-publishing it. The optimizer state (the
momentum buffer, or Adam's step and moments) stays in Redis between rounds. A retried step is a
no-op: a version that already exists is never overwritten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import redis

from p2ptrain import wire
from p2ptrain.accumulator import Accumulator, lua_library


class ModelUpdateError(RuntimeError):
    """Redis refused a model update (bad hyper-parameter, shape mismatch, non-finite gradient, no model)."""


@dataclass(frozen=True)
class SgdSettings:
    """``torch.optim.SGD``'s hyper-parameters."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def arguments(self) -> list[object]:
        return [repr(float(v)) for v in (self.lr, self.momentum, self.dampening, self.weight_decay)] + [
            int(self.nesterov)
        ]

    @property
    def has_state(self) -> bool:
        return self.momentum != 0


@dataclass(frozen=True)
class AdamSettings:
    """``torch.optim.Adam`` (``decoupled=True``: ``torch.optim.AdamW``) hyper-parameters; amsgrad off."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def arguments(self) -> list[object]:
        values = (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)
        return [repr(float(v)) for v in values] + [int(self.decoupled)]

    @property
    def has_state(self) -> bool:
        return True


@dataclass(frozen=True)
class ModelUpdater:
    """Runs optimizer steps inside one Redis, with the module's commands or the Lua functions."""

    kind: Literal["module", "lua"]

    @classmethod
    def like(cls, accumulator: Accumulator) -> ModelUpdater:
        """The updater matching a detected accumulator (same module, same Lua library)."""
        return cls(accumulator.kind)

    def step(
        self,
        client: redis.Redis,
        settings: SgdSettings | AdamSettings,
        source_key: str,
        target_key: str,
        state_key: str,
        gradient: np.ndarray,
        *,
        ttl_seconds: int | None = None,
        reuse: str | None = None,
    ) -> bool:
        """Model ``source_key`` minus one step along ``gradient`` becomes ``target_key``.

        ``target_key == source_key`` updates in place. Returns False when ``target_key`` already
        existed (the step was taken before: nothing changed). ``ttl_seconds`` expires the new
        version and the optimizer state. ``reuse``: an older version no one reads any more, removed
        by the step; the module writes the new version into its value and renames it, instead of
        allocating a new one and freeing the old (REUSE).
        """
        blob = _float32_blob(gradient)
        extra: list[object] = [] if ttl_seconds is None else ["EX", int(ttl_seconds)]
        arguments = [blob, *settings.arguments(), *extra]
        keys: tuple[str, ...] = (source_key, target_key, state_key)
        if reuse is not None and self.kind == "module":
            arguments += ["REUSE", reuse]
        elif reuse is not None:
            keys += (reuse,)
        try:
            if self.kind == "module":
                command = "P2P.SGD" if isinstance(settings, SgdSettings) else "P2P.ADAM"
                reply = client.execute_command(command, *keys, *arguments)
            else:
                function = "p2p_sgd" if isinstance(settings, SgdSettings) else "p2p_adam"
                reply = _fcall(client, function, keys, arguments)
        except redis.ResponseError as exc:
            raise ModelUpdateError(f"updating {source_key} into {target_key} failed: {exc}") from exc
        return bool(reply)


def settings_for(name: str, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> SgdSettings | AdamSettings:
    """The in-database settings for a job's ``optimizer`` (``sgd``, ``adam``, ``adamw``) as the peer builds it."""
    if not (math.isfinite(lr) and lr >= 0):
        raise ModelUpdateError(f"optimizer.learningRate={lr!r} must be a finite number >= 0")
    if name == "sgd":
        return SgdSettings(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return AdamSettings(lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return AdamSettings(lr=lr, weight_decay=weight_decay, decoupled=True)
    raise ModelUpdateError(f"optimizer.name={name!r} cannot run in the database: expected sgd, adam or adamw")


def read_model(client: redis.Redis, key: str, *, expected_numel: int | None = None) -> np.ndarray:
    """A model version as float32 parameters (validated like any wire tensor)."""
    data = client.get(key)
    if data is None:
        raise ModelUpdateError(f"model {key} does not exist")
    assert isinstance(data, bytes | bytearray)
    return wire.decode_tensor(data, expected_numel=expected_numel, reuse=True)


# Adam's state key: "P2PA", 4 zero bytes, the step count as float64, then exp_avg and exp_avg_sq.
_ADAM_MAGIC = b"P2PA\0\0\0\0"
_ADAM_HEADER = 16


def read_state(
    client: redis.Redis, settings: SgdSettings | AdamSettings, state_key: str, numel: int
) -> dict[str, np.ndarray | float] | None:
    """The optimizer state kept in Redis, named as torch names it (for checkpoints); None before step 1.

    SGD: ``{"momentum_buffer": ...}``; Adam: ``{"step": ..., "exp_avg": ..., "exp_avg_sq": ...}``.
    """
    if not settings.has_state:
        return None
    data = client.get(state_key)
    if data is None:
        return None
    assert isinstance(data, bytes | bytearray)
    if isinstance(settings, SgdSettings):
        if len(data) != 4 * numel:
            raise ModelUpdateError(f"optimizer state {state_key} has {len(data)} bytes, expected {4 * numel}")
        return {"momentum_buffer": np.frombuffer(data, dtype="<f4").astype(np.float32)}
    if len(data) != _ADAM_HEADER + 8 * numel or not data.startswith(_ADAM_MAGIC):
        raise ModelUpdateError(f"optimizer state {state_key} is not a P2P.ADAM state of {numel} parameters")
    moments = np.frombuffer(data, dtype="<f4", offset=_ADAM_HEADER).astype(np.float32)
    step = float(np.frombuffer(data, dtype="<f8", count=1, offset=8)[0])
    return {"step": step, "exp_avg": moments[:numel], "exp_avg_sq": moments[numel:]}


def write_state(
    client: redis.Redis, settings: SgdSettings | AdamSettings, state_key: str, state: dict[str, np.ndarray | float]
) -> None:
    """Restore the optimizer state :func:`read_state` returned (from a checkpoint) into Redis."""
    if isinstance(settings, SgdSettings):
        client.set(state_key, _float32_blob(np.asarray(state["momentum_buffer"])))
        return
    step = float(state["step"])
    if not (step >= 1 and step == int(step)):
        raise ModelUpdateError(f"Adam state step={step!r} must be a whole number >= 1")
    header = _ADAM_MAGIC + np.array([step], dtype="<f8").tobytes()
    moments = (_float32_blob(np.asarray(state[name])) for name in ("exp_avg", "exp_avg_sq"))
    client.set(state_key, b"".join((header, *moments)))


def _float32_blob(gradient: np.ndarray) -> memoryview:
    """The gradient's little-endian float32 bytes, as a view when it already is that (no copy: redis-py
    sends a large memoryview argument as it is)."""
    array = np.ascontiguousarray(gradient, dtype="<f4").reshape(-1)
    return memoryview(array.data).cast("B")


def _fcall(client: redis.Redis, function: str, keys: tuple[str, ...], arguments: list[object]) -> Any:
    """FCALL, loading the library first if this server does not have it (it restarted empty)."""
    try:
        return client.fcall(function, len(keys), *keys, *arguments)
    except redis.ResponseError as exc:
        if "function not found" not in str(exc).lower():
            raise
    client.function_load(lua_library(), replace=True)
    return client.fcall(function, len(keys), *keys, *arguments)
