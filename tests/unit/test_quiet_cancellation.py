"""The event loop's exception handler used by ``p2ptrain run``: an interrupt that cancels a server
connection prints no traceback (Python 3.11's asyncio streams logs one otherwise), other errors still do."""

from __future__ import annotations

import asyncio
import logging

import pytest

from p2ptrain.asgi import quiet_cancellation


def test_a_cancelled_connection_is_not_reported_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.DEBUG):
            quiet_cancellation(loop, {"message": "Exception in callback ...", "exception": asyncio.CancelledError()})
            quiet_cancellation(loop, {"message": "Exception in callback ...", "exception": ValueError("a real bug")})
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "a real bug" in (errors[0].exc_text or str(errors[0].exc_info))
