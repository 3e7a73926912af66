"""Property-based fuzzing of the wire decoders: any input is decoded or refused with a WireError
(whose reason is a bounded metric label), never another exception."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain import wire

REASONS = {"malformed", "oversize", "version", "shape", "nonfinite", "content-type", "signature"}

header_fields = st.tuples(
    st.sampled_from([b"P2PT", b"P2PU", b"\0\0\0\0"]), st.integers(0, 3), st.integers(0, 5), st.integers(0, 3),
    st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
)


@st.composite
def tensors(draw: st.DrawFn) -> bytes:
    """Mostly well-formed headers with hostile fields and payloads, plus valid tensors cut or extended."""
    kind = draw(st.sampled_from(["header", "valid", "random"]))
    if kind == "header":
        magic, version, dtype, compression, numel = draw(header_fields)
        return struct.pack("<4sBBBxQ", magic, version, dtype, compression, numel) + draw(st.binary(max_size=300))
    if kind == "valid":
        values = draw(st.lists(st.floats(width=32), max_size=40))
        blob = wire.encode_tensor(np.asarray(values, dtype=np.float32), draw(st.sampled_from(["float32", "float16", "bfloat16"])),
                                  draw(st.sampled_from(["none", "zstd"])))
        cut = draw(st.integers(0, len(blob)))
        return blob[:cut] + draw(st.binary(max_size=8))
    return draw(st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(tensors(), st.one_of(st.none(), st.integers(0, 64)))
def test_decode_tensor_decodes_or_refuses_with_a_reason(data: bytes, expected_numel: int | None) -> None:
    try:
        array = wire.decode_tensor(data, expected_numel=expected_numel, max_bytes=1 << 16)
    except wire.WireError as exc:
        assert exc.reason in REASONS
        return
    assert array.dtype == np.float32 and np.isfinite(array).all()
    assert expected_numel is None or array.size == expected_numel


header_names = st.sampled_from(
    ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-signature", "ce-peer", "ce-round", "ce-dataref",
     "ce-time", "content-type", "ce-datacontenttype", "ce-"]
)
header_values = st.one_of(
    st.sampled_from(["1.0", "0.3", "", wire.GRADIENT_AVERAGED, wire.OCTET_STREAM, wire.JSON, wire.STRUCTURED, "%zz"]),
    st.text(max_size=20),
)
bodies = st.one_of(st.binary(max_size=200), tensors(), st.from_regex(rb'\{"[a-z_]{1,12}": ?("[^"]{0,9}"|\d{1,4}|\{\}|\[\])(, ?"[a-z_]{1,12}":1)?\}', fullmatch=True))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(header_names, header_values, max_size=8), bodies)
def test_from_http_decodes_or_refuses_with_a_reason(headers: dict[str, str], body: bytes) -> None:
    try:
        incoming = wire.from_http(headers, body, max_body_bytes=150)
        wire.verify(incoming, b"key")
        wire.event_json(incoming)
    except wire.WireError as exc:
        assert exc.reason in REASONS
