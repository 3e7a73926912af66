"""The wire format: tensor codec round trips and rejects bad input; events sign and verify."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2ptrain import wire

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e4, max_value=1e4)


@given(arrays(np.float32, st.integers(0, 300), elements=finite32), st.sampled_from(["none", "zstd"]))
def test_float32_round_trip_is_exact(values: np.ndarray, compression: str) -> None:
    decoded = wire.decode_tensor(wire.encode_tensor(values, "float32", compression), expected_numel=values.size)
    np.testing.assert_array_equal(decoded, values)
    assert decoded.dtype == np.float32 and decoded.flags.writeable


def test_a_bytearray_given_up_is_decoded_in_place_and_anything_else_is_copied() -> None:
    values = np.arange(-50, 50, dtype=np.float32) / 7
    blob = wire.encode_tensor(values)
    given_up = bytearray(blob)
    decoded = wire.decode_tensor(given_up, expected_numel=values.size, reuse=True)
    np.testing.assert_array_equal(decoded, values)
    assert np.shares_memory(decoded, np.frombuffer(given_up, dtype=np.uint8)) and decoded.flags.writeable
    kept = bytearray(blob)  # without reuse the caller keeps its buffer: the array is a copy
    copied = wire.decode_tensor(kept, reuse=False)
    assert not np.shares_memory(copied, np.frombuffer(kept, dtype=np.uint8)) and copied.flags.writeable
    # bytes cannot be written: reuse or not, the array is a writable copy; so is a compressed payload
    for data, reuse in ((blob, True), (bytearray(wire.encode_tensor(values, compression="zstd")), True)):
        other = wire.decode_tensor(data, reuse=reuse)
        np.testing.assert_array_equal(other, values)
        assert other.flags.writeable and other.dtype == np.float32
    broken = bytearray(blob)
    broken[-4:] = np.float32(np.nan).tobytes()  # checked as ever: a reused buffer is no shortcut
    with pytest.raises(wire.WireError) as info:
        wire.decode_tensor(broken, reuse=True)
    assert info.value.reason == "nonfinite"


@given(arrays(np.float32, st.integers(1, 200), elements=finite32), st.sampled_from(["float16", "bfloat16"]))
def test_half_precision_round_trip_is_within_its_precision(values: np.ndarray, dtype: str) -> None:
    decoded = wire.decode_tensor(wire.encode_tensor(values, dtype, "zstd"))
    relative = 2**-8 if dtype == "bfloat16" else 2**-11
    np.testing.assert_allclose(decoded, values, rtol=relative, atol=1e-3)


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda b: b[:10], "malformed"),
        (lambda b: b"XXXX" + b[4:], "malformed"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:5] + bytes([77]) + b[6:], "malformed"),
        (lambda b: b[:-4], "shape"),
        (lambda b: b + b"\0\0\0\0", "shape"),
    ],
    ids=["truncated-header", "bad-magic", "future-version", "bad-dtype", "short-payload", "long-payload"],
)
def test_corrupt_tensors_are_rejected_with_a_reason(mutate, reason: str) -> None:
    blob = wire.encode_tensor(np.arange(8, dtype=np.float32))
    with pytest.raises(wire.WireError) as info:
        wire.decode_tensor(mutate(blob))
    assert info.value.reason == reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    values = np.ones(16, dtype=np.float32)
    values[5] = bad
    with pytest.raises(wire.WireError, match="NaN or Inf") as info:
        wire.decode_tensor(wire.encode_tensor(values))
    assert info.value.reason == "nonfinite"


def test_wrong_element_count_is_a_shape_error() -> None:
    with pytest.raises(wire.WireError, match="has 8 elements, expected 9") as info:
        wire.decode_tensor(wire.encode_tensor(np.zeros(8)), expected_numel=9)
    assert info.value.reason == "shape"


def test_oversize_input_is_refused_before_decoding() -> None:
    blob = wire.encode_tensor(np.zeros(1000, dtype=np.float32))
    with pytest.raises(wire.WireError) as info:
        wire.decode_tensor(blob, max_bytes=1000)
    assert info.value.reason == "oversize"


def test_zstd_bomb_cannot_inflate_past_its_header() -> None:
    header = wire.encode_tensor(np.zeros(4, dtype=np.float32), compression="zstd")[:16]
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    with pytest.raises(wire.WireError) as info:
        wire.decode_tensor(header + bomb)
    assert info.value.reason in {"malformed", "shape"}


KEY = b"k" * 32


def _signed(**overrides):
    event = wire.build_event(
        wire.GRADIENT_AVERAGED,
        "/jobs/default/j/peers/1",
        data=wire.encode_tensor(np.arange(4, dtype=np.float32)),
        subject="round/3",
        extensions={"round": 3, "peer": 1},
        key=KEY,
    )
    headers, body = wire.to_http(event)
    headers.update(overrides)
    return headers, body


def test_signed_event_round_trips_through_http_headers() -> None:
    headers, body = _signed()
    assert headers["content-type"] == wire.OCTET_STREAM and headers["ce-type"] == wire.GRADIENT_AVERAGED
    event = wire.from_http(headers, body)
    wire.verify(event, KEY)
    assert event.get_extension("round") == "3"
    np.testing.assert_array_equal(wire.decode_tensor(wire.event_bytes(event)), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("header", ["ce-round", "ce-peer", "ce-source", "ce-type", "ce-id"])
def test_tampered_attributes_fail_verification(header: str) -> None:
    headers, body = _signed(**{header: "tampered"})
    with pytest.raises(wire.WireError, match="wrong signature"):
        wire.verify(wire.from_http(headers, body), KEY)


def test_tampered_body_fails_verification() -> None:
    headers, body = _signed()
    with pytest.raises(wire.WireError, match="wrong signature"):
        wire.verify(wire.from_http(headers, body[:-1] + b"\1"), KEY)


def test_unsigned_event_fails_verification() -> None:
    headers, body = _signed()
    del headers["ce-signature"]
    with pytest.raises(wire.WireError, match="not signed") as info:
        wire.verify(wire.from_http(headers, body), KEY)
    assert info.value.reason == "signature"


def test_json_events_verify_after_the_sdk_parses_them() -> None:
    event = wire.build_event(wire.GRADIENT_REQUESTED, "/p", data={"indices": [1, 2], "loss": 0.1}, key=KEY)
    parsed = wire.from_http(*wire.to_http(event))
    wire.verify(parsed, KEY)
    assert wire.event_json(parsed) == {"indices": [1, 2], "loss": 0.1}


_ID_LESS = {"ce-specversion": "1.0", "ce-source": "/p", "ce-type": wire.GRADIENT_AVERAGED, "ce-signature": "00",
            "content-type": wire.OCTET_STREAM}


@pytest.mark.parametrize(
    "headers,body,reason,names",
    [
        ({"content-type": "text/plain"}, b"hello", "content-type", "text/plain"),
        ({"ce-type": "x"}, b"", "malformed", "ce-id"),
        ({"ce-specversion": "0.1", "ce-id": "1"}, b"", "malformed", "ce-source"),
        # The SDK would invent an id; the receiver would then blame the signature.
        (_ID_LESS, b"\0" * 16, "malformed", "ce-id"),
        ({**_ID_LESS, "ce-id": "1", "content-type": "text/csv"}, b"1,2", "content-type", "text/csv"),
        ({"content-type": wire.STRUCTURED}, b'{"id": "1", "id": "2"}', "malformed", "twice"),
        ({"content-type": wire.STRUCTURED}, b'{"specversion": "1.0", "source": "/p", "type": "t"}', "malformed", "'id'"),
        ({"content-type": wire.STRUCTURED}, b"[1, 2]", "malformed", "JSON object"),
        ({"content-type": wire.STRUCTURED}, b"\xff", "malformed", "UTF-8"),
    ],
    ids=["not-an-event", "missing-attributes", "bad-specversion", "missing-id", "wrong-data-type",
         "duplicate-member", "structured-missing-id", "structured-not-object", "structured-not-utf8"],
)
def test_malformed_events_are_rejected_with_their_reason(headers: dict[str, str], body: bytes, reason: str, names: str) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.from_http(headers, body)
    assert info.value.reason == reason
    assert names in str(info.value)


def test_signature_covers_json_data_exactly_as_sent() -> None:
    """A client whose serialiser spaces or orders JSON differently signs the bytes it sends."""
    sent = b'{ "loss": 0.1,  "indices": [1, 2] }'
    attributes = {"specversion": "1.0", "id": "7", "source": "/p", "type": wire.GRADIENT_REQUESTED,
                  "datacontenttype": wire.JSON}
    headers = {f"ce-{k}": v for k, v in attributes.items() if k != "datacontenttype"}
    headers |= {"content-type": wire.JSON, "ce-signature": wire.signature(attributes, sent, KEY)}
    parsed = wire.from_http(headers, sent)
    wire.verify(parsed, KEY)
    assert wire.event_bytes(parsed) == sent and wire.event_json(parsed) == {"loss": 0.1, "indices": [1, 2]}
    signed = wire.signature(attributes, sent, KEY)
    envelope = (f'{{"specversion":"1.0","id":"7","source":"/p","type":"{wire.GRADIENT_REQUESTED}",'
                f'"datacontenttype":"application/json","signature":"{signed}","data": {sent.decode()}}}')
    structured = wire.from_http({"content-type": wire.STRUCTURED}, envelope.encode())
    wire.verify(structured, KEY)
    assert wire.event_bytes(structured) == sent


def test_oversize_event_body_is_refused() -> None:
    headers, body = _signed()
    with pytest.raises(wire.WireError) as info:
        wire.from_http(headers, body, max_body_bytes=10)
    assert info.value.reason == "oversize"
