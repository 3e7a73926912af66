"""The wire: tensor encoding and signed CloudEvents over HTTP.

Tensors travel as raw little-endian float32 (or fp16/bf16) behind a 16-byte typed header, optionally
zstd-compressed; nothing is ever pickled. Events are CloudEvents in binary content mode built and parsed
with the ``cloudevents`` SDK, and signed with HMAC-SHA256 over their attributes and body. Every decode
step validates its input and raises :class:`WireError` whose ``reason`` is a bounded metric label.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zstandard
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

GRADIENT_REQUESTED = "dev.p2ptrain.gradient.requested.v1"
GRADIENT_COMPUTED = "dev.p2ptrain.gradient.computed.v1"
GRADIENT_AVERAGED = "dev.p2ptrain.gradient.averaged.v1"
PEER_HEARTBEAT = "dev.p2ptrain.peer.heartbeat.v1"
STATE_REQUESTED = "dev.p2ptrain.state.requested.v1"

OCTET_STREAM = "application/octet-stream"
JSON = "application/json"
SIGNATURE_ATTRIBUTE = "signature"
DATAREF_ATTRIBUTE = "dataref"

_MAGIC = b"P2PT"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBxQ")  # magic, format version, dtype, compression, pad, element count
_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "float32": (1, torch.float32),
    "float16": (2, torch.float16),
    "bfloat16": (3, torch.bfloat16),
}
_DTYPE_BY_CODE = {code: (name, dt) for name, (code, dt) in _DTYPES.items()}
_COMPRESSIONS = {"none": 0, "zstd": 1}
_COMPRESSION_BY_CODE = {code: name for name, code in _COMPRESSIONS.items()}
DEFAULT_MAX_BYTES = 1 << 30



def peer_source(namespace: str, job: str, index: int) -> str:
    """The CloudEvents ``source`` of a peer's events: receivers check it against the sender's index."""
    return f"/jobs/{namespace}/{job}/peers/{index}"

class WireError(ValueError):
    """Input from the network that cannot be accepted; ``reason`` names why (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Tensors


def encode_tensor(values: torch.Tensor | np.ndarray, dtype: str = "float32", compression: str = "none") -> bytes:
    """A flat tensor as header + little-endian payload in ``dtype``, optionally zstd-compressed."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSIONS)}, got {compression!r}")
    tensor = torch.as_tensor(values).detach().reshape(-1).to(_DTYPES[dtype][1]).contiguous()
    # Little-endian on every platform we build for; view as bytes without a copy through numpy.
    payload = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    if compression == "zstd":
        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, _DTYPES[dtype][0], _COMPRESSIONS[compression], tensor.numel())
    return header + payload


def decode_tensor(data: bytes, *, expected_numel: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode :func:`encode_tensor` output into a writable float32 vector, validating everything."""
    if len(data) > max_bytes:
        raise WireError("oversize", f"tensor of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _HEADER.size:
        raise WireError("malformed", f"tensor has {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, dtype_code, compression_code, numel = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise WireError("malformed", f"tensor magic is {magic!r}, expected {_MAGIC!r}")
    if version != _FORMAT_VERSION:
        raise WireError("version", f"tensor format version {version} is not supported (expected {_FORMAT_VERSION})")
    if dtype_code not in _DTYPE_BY_CODE:
        raise WireError("malformed", f"unknown tensor dtype code {dtype_code}")
    if compression_code not in _COMPRESSION_BY_CODE:
        raise WireError("malformed", f"unknown tensor compression code {compression_code}")
    if expected_numel is not None and numel != expected_numel:
        raise WireError("shape", f"tensor has {numel} elements, expected {expected_numel}")
    _, torch_dtype = _DTYPE_BY_CODE[dtype_code]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected_bytes = numel * itemsize
    if expected_bytes > max_bytes:
        raise WireError("oversize", f"tensor of {numel} elements exceeds the limit of {max_bytes} bytes")
    payload = memoryview(data)[_HEADER.size :]
    if _COMPRESSION_BY_CODE[compression_code] == "zstd":
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected_bytes)
        except zstandard.ZstdError as exc:
            raise WireError("malformed", f"tensor payload is not valid zstd: {exc}") from exc
    else:
        raw = bytes(payload)
    if len(raw) != expected_bytes:
        raise WireError("shape", f"tensor payload has {len(raw)} bytes, header promises {expected_bytes}")
    if torch_dtype == torch.float32:
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True)
    else:
        array = torch.frombuffer(bytearray(raw), dtype=torch_dtype).to(torch.float32).numpy() if numel else (
            np.zeros(0, dtype=np.float32)
        )
    if not np.isfinite(array).all():
        raise WireError("nonfinite", "tensor contains NaN or Inf values")
    return array


def raw_float32(values: torch.Tensor | np.ndarray) -> bytes:
    """Headerless little-endian float32 bytes: the layout of Redis accumulators."""
    return np.ascontiguousarray(torch.as_tensor(values).detach().reshape(-1).numpy(), dtype="<f4").tobytes()


# ---------------------------------------------------------------------------------------------------
# Events


def build_event(
    event_type: str,
    source: str,
    *,
    data: bytes | Mapping[str, Any],
    subject: str | None = None,
    extensions: Mapping[str, str | int] | None = None,
    key: bytes | None = None,
) -> CloudEvent:
    """A CloudEvent with raw (octet-stream) or JSON data, signed when ``key`` is given."""
    attributes: dict[str, Any] = {"type": event_type, "source": source, "id": str(uuid.uuid4()), "specversion": "1.0"}
    if subject is not None:
        attributes["subject"] = subject
    if isinstance(data, bytes | bytearray):
        attributes["datacontenttype"] = OCTET_STREAM
        payload: Any = bytes(data)
    else:
        attributes["datacontenttype"] = JSON
        payload = dict(data)
    for name, value in (extensions or {}).items():
        attributes[name] = str(value)
    if key is not None:
        attributes[SIGNATURE_ATTRIBUTE] = _signature(attributes, _canonical_body(payload), key)
    try:
        return CloudEvent(attributes=attributes, data=payload)
    except BaseCloudEventException as exc:
        raise ValueError(f"cannot build event {event_type}: {exc}") from exc


def to_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary content mode: attributes as ce-* headers, data as the body."""
    message = to_binary_event(event)
    return dict(message.headers), message.body


def from_http(headers: Mapping[str, str], body: bytes, *, max_body_bytes: int = DEFAULT_MAX_BYTES) -> CloudEvent:
    """Decode an incoming binary- or structured-mode event; raises WireError('malformed'|'oversize')."""
    if len(body) > max_body_bytes:
        raise WireError("oversize", f"event body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        event = from_http_event(HTTPMessage(headers=lowered, body=body))
    except (BaseCloudEventException, ValueError, KeyError, TypeError) as exc:
        raise WireError("malformed", f"not a valid CloudEvent: {exc}") from exc
    if not isinstance(event, CloudEvent):
        raise WireError("malformed", f"CloudEvents specversion {event.get_specversion()} is not supported (need 1.0)")
    return event


def verify(event: CloudEvent, key: bytes) -> None:
    """Check the event's HMAC signature; raises WireError('signature')."""
    given = event.get_extension(SIGNATURE_ATTRIBUTE)
    if not given:
        raise WireError("signature", f"event {event.get_type()} from {event.get_source()} is not signed")
    expected = _signature(event.get_attributes(), _canonical_body(event.get_data()), key)
    if not hmac.compare_digest(str(given), expected):
        raise WireError("signature", f"event {event.get_type()} from {event.get_source()} has a wrong signature")


def event_bytes(event: CloudEvent) -> bytes:
    """The event's data as bytes (the SDK hands undecodable bodies back as str when they are UTF-8)."""
    return _canonical_body(event.get_data())


def event_json(event: CloudEvent) -> dict[str, Any]:
    """The event's data as a JSON object, or WireError('malformed')."""
    data = event.get_data()
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError("malformed", f"event data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WireError("malformed", f"event data must be a JSON object, got {type(data).__name__}")
    return data


def _canonical_body(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _signature(attributes: Mapping[str, Any], body: bytes, key: bytes) -> str:
    """HMAC-SHA256 over every attribute but ``time`` and the signature itself, and the body's digest.

    ``time`` is left out because its textual form changes across the HTTP binding; ids, source, type,
    subject and our extensions (round, peer, version) are what a forger would need to change.
    """
    signed = sorted(
        (name, str(value))
        for name, value in attributes.items()
        if name not in (SIGNATURE_ATTRIBUTE, "time") and value is not None
    )
    canonical = "\n".join(f"{name}={value}" for name, value in signed)
    canonical += "\n" + hashlib.sha256(body).hexdigest()
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()
