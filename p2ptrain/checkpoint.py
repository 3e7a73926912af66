"""Model and optimizer state as bytes, without pickle (safetensors + JSON metadata).

Checkpoints live in the peer's Redis and may be read back by another peer or after a restart, so
they are untrusted input: safetensors stores only named tensors, and the optimizer's non-tensor state
(param groups, hyper-parameters) travels as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as st_save


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


def pack_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """Model, optimizer and ``extra`` tensors (state kept across rounds, e.g. an aggregation rule's)."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{name}": value.detach().contiguous() for name, value in model.state_dict().items()
    }
    tensors.update({f"extra.{name}": value.detach().contiguous() for name, value in (extra or {}).items()})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in opt_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {
        "meta": json.dumps(meta),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    return st_save(tensors, metadata=metadata)


def st_load(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load``, which takes ``bytes`` only: a large value read from Redis arrives as a
    ``bytearray`` (``p2ptrain.bulkread``) and is copied here, on the rare paths that load a state."""
    return _st_load(data if isinstance(data, bytes) else bytes(data))


def unpack_state(data: bytes, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``data`` into ``model`` and ``optimizer``; returns the checkpoint's metadata."""
    try:
        tensors = st_load(data)
        metadata = _metadata(data)
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entries in json.loads(metadata["optim_scalars"]).items():
            state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        meta: dict[str, Any] = json.loads(metadata["meta"])
        return meta
    except (SafetensorError, RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not fit this job's model/optimizer: {exc}") from exc


def extra_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors :func:`pack_state` stored (none in checkpoints written without them)."""
    try:
        return {k.removeprefix("extra."): v for k, v in st_load(data).items() if k.startswith("extra.")}
    except SafetensorError as exc:
        raise CheckpointError(f"not a checkpoint: {exc}") from exc


def model_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A trained model as users load it: ``safetensors.torch.load`` / ``model.load_state_dict``."""
    return st_save({name: t.detach().contiguous() for name, t in tensors.items()}, metadata=metadata)


def model_tensors(state: bytes) -> dict[str, torch.Tensor]:
    """The model's tensors out of a checkpoint made by ``pack_state``."""
    try:
        return {k.removeprefix("model."): v for k, v in st_load(state).items() if k.startswith("model.")}
    except SafetensorError as exc:
        raise CheckpointError(f"not a checkpoint: {exc}") from exc


def median_state(states: Sequence[bytes]) -> bytes:
    """The coordinate-wise median of checkpoints of the same model and optimizer.

    Robust to a minority of arbitrary (Byzantine) checkpoints: every merged coordinate lies within
    the range of the honest ones. Non-tensor metadata comes from the checkpoint closest to the median.
    """
    if not states:
        raise CheckpointError("no checkpoints to merge")
    try:
        loaded = [st_load(state) for state in states]
    except SafetensorError as exc:
        raise CheckpointError(f"not a checkpoint: {exc}") from exc
    layout = {name: (tensor.shape, tensor.dtype) for name, tensor in loaded[0].items()}
    for tensors in loaded[1:]:
        if {name: (t.shape, t.dtype) for name, t in tensors.items()} != layout:
            raise CheckpointError("checkpoints have different tensors, shapes or dtypes: not replicas of one job")
    merged = {
        name: torch.stack([tensors[name] for tensors in loaded]).double().nanmedian(dim=0).values.to(dtype).contiguous()
        for name, (_, dtype) in layout.items()
    }

    def distance(tensors: dict[str, torch.Tensor]) -> float:
        d = sum(float((tensors[n].double() - merged[n].double()).square().sum()) for n in layout)
        return d if math.isfinite(d) else math.inf

    closest = min(range(len(states)), key=lambda i: distance(loaded[i]))
    return st_save(merged, metadata=_metadata(states[closest]))


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    metadata: dict[str, str] = header.get("__metadata__", {})
    return metadata
