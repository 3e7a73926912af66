"""``asgi.off_loop_if_large``: the exchange checks and decodes a small event on the event loop (cheaper
than a thread hop) and a large one in a worker thread (so health probes keep answering meanwhile)."""

from __future__ import annotations

import threading

from p2ptrain import asgi


async def test_small_work_runs_on_the_loop_and_large_work_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    assert await asgi.off_loop_if_large(asgi.ON_LOOP_MAX_BYTES, threading.get_ident) == loop_thread
    assert await asgi.off_loop_if_large(asgi.ON_LOOP_MAX_BYTES + 1, threading.get_ident) != loop_thread


async def test_arguments_and_errors_pass_through_either_way() -> None:
    for size in (1, asgi.ON_LOOP_MAX_BYTES + 1):
        assert await asgi.off_loop_if_large(size, divmod, 7, 2) == (3, 1)
        try:
            await asgi.off_loop_if_large(size, divmod, 1, 0)
        except ZeroDivisionError:
            continue
        raise AssertionError("the error of the work must reach the caller")
