"""The wire: tensor encoding and signed CloudEvents over HTTP.

Tensors travel as raw little-endian float32 (or fp16/bf16) behind a 16-byte typed header, optionally
zstd-compressed; nothing is ever pickled. Events are CloudEvents (binary or structured content mode)
signed with HMAC-SHA256 over their attributes and the data bytes exactly as sent, so a client in any
language can sign (the contract is docs/wire.md). Every decode step validates its input and raises
:class:`WireError` whose ``reason`` is a bounded metric label.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
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
STRUCTURED = "application/cloudevents+json"
SIGNATURE_ATTRIBUTE = "signature"
DATAREF_ATTRIBUTE = "dataref"

_MAGIC = b"P2PT"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBxQ")  # magic, format version, dtype, compression, pad, element count
TENSOR_HEADER_BYTES = _HEADER.size
_DTYPES: dict[str, tuple[int, torch.dtype]] = {"float32": (1, torch.float32), "float16": (2, torch.float16),
                                               "bfloat16": (3, torch.bfloat16)}
_DTYPE_BY_CODE = {code: (name, dt) for name, (code, dt) in _DTYPES.items()}
_COMPRESSIONS = {"none": 0, "zstd": 1}
_COMPRESSION_BY_CODE = {code: name for name, code in _COMPRESSIONS.items()}
DEFAULT_MAX_BYTES = 1 << 30
# Binary mode: these ce-* headers must be present and non-empty (the SDK would invent a missing id,
# and a receiver would then blame the signature for what is a malformed request).
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")


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
    # Little-endian on every platform we build for; viewed as bytes through numpy, no copy until the join.
    payload: bytes | memoryview = tensor.view(torch.uint8).numpy().data if tensor.numel() else b""
    if compression == "zstd":
        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, _DTYPES[dtype][0], _COMPRESSIONS[compression], tensor.numel())
    return b"".join((header, payload))  # one copy of the payload


def float32_buffer(numel: int) -> tuple[bytearray, torch.Tensor]:
    """An uncompressed float32 tensor of ``numel`` zeros as :func:`encode_tensor` writes it, and its
    payload as a writable tensor: what is written there is sent as it is, with no encoding."""
    buffer = bytearray(_HEADER.size + 4 * numel)
    _HEADER.pack_into(buffer, 0, _MAGIC, _FORMAT_VERSION, _DTYPES["float32"][0], _COMPRESSIONS["none"], numel)
    return buffer, torch.frombuffer(buffer, dtype=torch.float32, offset=_HEADER.size, count=numel)


def decode_tensor(
    data: bytes | bytearray, *, expected_numel: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
    reuse: bool = False,
) -> np.ndarray:
    """Decode :func:`encode_tensor` output into a writable float32 vector, validating everything.

    ``reuse``: ``data`` is a ``bytearray`` the caller gives up (a large value as ``p2ptrain.bulkread``
    received it), so an uncompressed float32 payload becomes the array in place, without a copy.
    """
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
    expected_bytes = numel * torch.empty((), dtype=torch_dtype).element_size()
    if expected_bytes > max_bytes:
        raise WireError("oversize", f"tensor of {numel} elements exceeds the limit of {max_bytes} bytes")
    payload = memoryview(data)[_HEADER.size :]
    raw: bytes | memoryview
    if _COMPRESSION_BY_CODE[compression_code] == "zstd":
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected_bytes)
        except zstandard.ZstdError as exc:
            raise WireError("malformed", f"tensor payload is not valid zstd: {exc}") from exc
    else:
        raw = payload  # a view: the float32 path below makes the one copy a writable array needs
    if len(raw) != expected_bytes:
        raise WireError("shape", f"tensor payload has {len(raw)} bytes, header promises {expected_bytes}")
    if torch_dtype == torch.float32:
        array = np.frombuffer(raw, dtype="<f4")
        if not (reuse and isinstance(data, bytearray) and array.dtype == np.float32 and array.flags.writeable):
            array = array.astype(np.float32, copy=True)  # the only copy
    else:
        array = torch.frombuffer(bytearray(raw), dtype=torch_dtype).float().numpy() if numel else np.zeros(0, np.float32)
    if not np.isfinite(array).all():  # numpy's isfinite is vectorised: 4x faster than a float64 sum
        raise WireError("nonfinite", "tensor contains NaN or Inf values")
    return array


def raw_float32(values: torch.Tensor | np.ndarray) -> memoryview:
    """Headerless little-endian float32 bytes: the layout of Redis accumulators. A byte view of the
    values (no copy when they are float32 already), which redis-py sends as it is."""
    array = np.ascontiguousarray(torch.as_tensor(values).detach().reshape(-1).numpy(), dtype="<f4")
    return array.view(np.uint8).data


# ---------------------------------------------------------------------------------------------------
# Events


def build_event(event_type: str, source: str, *, data: bytes | Mapping[str, Any], subject: str | None = None,
                extensions: Mapping[str, str | int] | None = None, key: bytes | None = None) -> CloudEvent:
    """A CloudEvent with raw (octet-stream) or JSON data, signed when ``key`` is given.

    JSON data is serialised here, once, and travels as these exact bytes: the signature covers what is
    sent, not a re-serialisation a foreign client could not reproduce.
    """
    attributes: dict[str, Any] = {"type": event_type, "source": source, "id": str(uuid.uuid4()), "specversion": "1.0"}
    if subject is not None:
        attributes["subject"] = subject
    if isinstance(data, bytes | bytearray):
        attributes["datacontenttype"] = OCTET_STREAM
        payload = bytes(data)
    else:
        attributes["datacontenttype"] = JSON
        payload = json.dumps(dict(data), sort_keys=True, separators=(",", ":")).encode()
    for name, value in (extensions or {}).items():
        attributes[name] = str(value)
    if key is not None:
        attributes[SIGNATURE_ATTRIBUTE] = signature(attributes, payload, key)
    try:
        return CloudEvent(attributes=attributes, data=payload)
    except BaseCloudEventException as exc:
        raise ValueError(f"cannot build event {event_type}: {exc}") from exc


def to_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary content mode: attributes as ce-* headers, data as the body."""
    message = to_binary_event(event)
    return dict(message.headers), message.body


@dataclass(frozen=True)
class Incoming:
    """A received event and its data bytes exactly as sent (what the signature covers)."""

    event: CloudEvent
    data: bytes

    def get_type(self) -> str:
        return self.event.get_type()

    def get_source(self) -> str:
        return self.event.get_source()

    def get_id(self) -> str:
        return self.event.get_id()

    def get_extension(self, name: str) -> Any:
        return self.event.get_extension(name)

    def get_attributes(self) -> dict[str, Any]:
        return self.event.get_attributes()


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def from_http(
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_body_bytes: int = DEFAULT_MAX_BYTES,
    data_content_types: Collection[str] = (OCTET_STREAM, JSON),
) -> Incoming:
    """Decode an incoming binary- or structured-mode event.

    Raises WireError: 'oversize'; 'content-type' (neither mode, or data of a type this receiver does not
    take); 'malformed' (a required attribute missing, an envelope that is not a JSON object, ...).
    """
    if len(body) > max_body_bytes:
        raise WireError("oversize", f"event body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    lowered = {k.lower(): v for k, v in headers.items()}
    content_type = media_type(lowered.get("content-type"))
    if any(name.startswith("ce-") for name in lowered):
        missing = [f"ce-{name}" for name in REQUIRED_ATTRIBUTES if not lowered.get(f"ce-{name}", "").strip()]
        if missing:
            raise WireError("malformed", f"binary-mode event lacks required header(s) {', '.join(missing)}")
        data = body
    elif content_type == STRUCTURED:
        data, content_type = _structured_data(body)
    else:
        raise WireError(
            "content-type",
            f"content-type {content_type or '(none)'!r} is neither a binary-mode event (ce-* headers) "
            f"nor a structured one ({STRUCTURED})",
        )
    if content_type not in data_content_types:
        raise WireError(
            "content-type", f"event data of type {content_type or '(none)'!r} is not accepted here "
            f"(expected {' or '.join(sorted(data_content_types))})",
        )
    try:
        event = from_http_event(HTTPMessage(headers=lowered, body=body))
    except (BaseCloudEventException, ValueError, KeyError, TypeError) as exc:
        raise WireError("malformed", f"not a valid CloudEvent: {exc}") from exc
    if not isinstance(event, CloudEvent):
        raise WireError("malformed", f"CloudEvents specversion {event.get_specversion()} is not supported (need 1.0)")
    return Incoming(event, data)


def _structured_data(body: bytes) -> tuple[bytes, str]:
    """The data bytes of a structured-mode envelope and its datacontenttype.

    ``data_base64`` gives its decoded bytes; ``data`` gives the bytes of its JSON value exactly as they
    stand in the envelope (a client signs the text it inserts, whatever its JSON serialiser).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("malformed", f"structured event is not UTF-8: {exc}") from exc
    members = _top_level_members(text)
    for name in REQUIRED_ATTRIBUTES:
        value = members.get(name)
        if value is None or not isinstance(json.loads(value), str) or not json.loads(value).strip():
            raise WireError("malformed", f"structured event lacks required string attribute {name!r}")
    content_type_json = members.get("datacontenttype")
    content_type = json.loads(content_type_json) if content_type_json is not None else JSON
    if not isinstance(content_type, str):
        raise WireError("malformed", "structured event's datacontenttype must be a string")
    if "data" in members and "data_base64" in members:
        raise WireError("malformed", "structured event has both data and data_base64")
    if "data_base64" in members:
        encoded = json.loads(members["data_base64"])
        try:
            return base64.b64decode(str(encoded), validate=True), media_type(content_type)
        except (ValueError, TypeError) as exc:
            raise WireError("malformed", f"data_base64 is not base64: {exc}") from exc
    return members.get("data", "").encode("utf-8"), media_type(content_type)


def _top_level_members(text: str) -> dict[str, str]:
    """The raw JSON text of each member of a top-level object; duplicate names are malformed."""
    decoder = json.JSONDecoder()
    members: dict[str, str] = {}

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def expect(i: int, char: str) -> int:
        i = skip(i)
        if i >= len(text) or text[i] != char:
            raise WireError("malformed", f"structured event is not a JSON object: expected {char!r} at offset {i}")
        return i + 1

    try:
        i = expect(0, "{")
        if skip(i) < len(text) and text[skip(i)] == "}":
            i = skip(i) + 1
        else:
            while True:
                i = skip(i)
                name, i = decoder.raw_decode(text, i)
                if not isinstance(name, str):
                    raise WireError("malformed", "structured event member names must be strings")
                if name in members:
                    raise WireError("malformed", f"structured event has member {name!r} twice")
                i = skip(expect(i, ":"))
                _, end = decoder.raw_decode(text, i)
                members[name] = text[i:end]
                i = skip(end)
                if i < len(text) and text[i] == ",":
                    i += 1
                    continue
                i = expect(i, "}")
                break
    except (ValueError, RecursionError) as exc:
        raise WireError("malformed", f"structured event is not valid JSON: {exc}") from exc
    if skip(i) != len(text):
        raise WireError("malformed", "structured event has trailing data after its JSON object")
    return members


def _as_incoming(event: Incoming | CloudEvent) -> Incoming:
    """func-python hands a parsed CloudEvent (``func deploy``): its data re-serialised as our senders do."""
    if isinstance(event, Incoming):
        return event
    return Incoming(event, _canonical_body(event.get_data()))


def verify(event: Incoming | CloudEvent, key: bytes) -> None:
    """Check the event's HMAC signature; raises WireError('signature')."""
    incoming = _as_incoming(event)
    given = incoming.get_extension(SIGNATURE_ATTRIBUTE)
    if not given:
        raise WireError("signature", f"event {incoming.get_type()} from {incoming.get_source()} is not signed")
    expected = signature(incoming.get_attributes(), incoming.data, key)
    if not hmac.compare_digest(str(given).encode(), expected.encode()):
        raise WireError("signature", f"event {incoming.get_type()} from {incoming.get_source()} has a wrong signature")


def event_bytes(event: Incoming | CloudEvent) -> bytes:
    """The event's data bytes as sent."""
    return _as_incoming(event).data


def event_json(event: Incoming | CloudEvent) -> dict[str, Any]:
    """The event's data as a JSON object, or WireError('malformed')."""
    try:
        data = json.loads(_as_incoming(event).data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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


def canonical_string(attributes: Mapping[str, Any], data: bytes) -> str:
    """What is signed: ``name=value`` lines of every attribute but ``signature`` and ``time``, sorted by
    name, then the hex SHA-256 of the data bytes as sent (docs/wire.md).

    ``time`` is left out because its textual form changes across the HTTP binding; ids, source, type,
    subject and our extensions (round, peer, version) are what a forger would need to change.
    """
    signed = sorted(
        (name, str(value))
        for name, value in attributes.items()
        if name not in (SIGNATURE_ATTRIBUTE, "time") and value is not None
    )
    lines = [f"{name}={value}" for name, value in signed]
    return "\n".join([*lines, hashlib.sha256(data).hexdigest()])


def signature(attributes: Mapping[str, Any], data: bytes, key: bytes) -> str:
    """HMAC-SHA256 (hex) of :func:`canonical_string` under the job's signing key."""
    return hmac.new(key, canonical_string(attributes, data).encode(), hashlib.sha256).hexdigest()
