"""Log lines carry their fields (extra= and process context) as key=value on the event's line."""

from __future__ import annotations

import logging
import sys

from p2ptrain.logs import KeyValueFormatter


def _record(msg: str, *, extra: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("p2ptrain.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logger.makeRecord("p2ptrain.test", logging.INFO, __file__, 1, msg, (), exc_info, extra=extra)


def test_extra_fields_follow_the_message_after_the_context() -> None:
    formatter = KeyValueFormatter({"job": "digits", "peer": 2})
    line = formatter.format(_record("round done", extra={"round": 3, "loss": 0.123456789, "accuracy": None}))
    assert line.endswith("INFO p2ptrain.test round done job=digits peer=2 round=3 loss=0.123457")
    assert "accuracy" not in line  # unknown values are left out, not printed as None


def test_values_with_spaces_or_quotes_are_quoted() -> None:
    line = KeyValueFormatter().format(_record("retrying", extra={"error": 'HTTP 503: no "instance"', "part": ""}))
    assert 'error="HTTP 503: no \\"instance\\""' in line
    assert 'part=""' in line


def test_fields_stay_on_the_event_line_above_the_traceback() -> None:
    line = KeyValueFormatter({"peer": 0}).format(_record("failed", exc=True))
    first, *rest = line.split("\n")
    assert first.endswith("failed peer=0")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"


def test_a_plain_record_without_fields_is_unchanged() -> None:
    line = KeyValueFormatter().format(_record("hello"))
    assert line.endswith("INFO p2ptrain.test hello")
