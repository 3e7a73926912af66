"""Process logging: one event per line, with its fields as ``key=value`` after the message.

Library code logs ``log.info("round done", extra={"round": 3, "loss": 0.25})``; this formatter writes
``... INFO p2ptrain.peer round done job=digits peer=1 round=3 loss=0.25``, so ``kubectl logs`` and
``grep`` see the fields, and log shippers can parse them (logfmt). The process's context (job, peer)
is set once by the command that starts it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s %(message)s`` followed by context and extra fields."""

    def __init__(self, context: Mapping[str, object] | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.context = dict(context or {})

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {**self.context, **{k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}}
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep fields on the event's line, tracebacks below
        return head + " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items()) + newline + rest


def configure(level: str, context: Mapping[str, object] | None = None) -> None:
    """Log to stderr at ``level``; quiet the per-request loggers that would drown the per-round events."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(context))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def set_context(**context: object) -> None:
    """Add fields (job, peer, ...) to every line this process logs from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, KeyValueFormatter):
            handler.formatter.context.update(context)
