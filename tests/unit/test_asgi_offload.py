"""``asgi.off_loop_if_large``: the exchange checks and decodes a small event on the event loop (cheaper
than a thread hop) and a large one in a worker thread (so health probes keep answering meanwhile);
``asgi.OnLoopWhileQuick`` decides by the last run's CPU time instead."""

from __future__ import annotations

import threading
import time

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


def _busy(seconds: float) -> int:
    """``seconds`` of this thread's CPU, then the thread's id."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass
    return threading.get_ident()


async def test_work_moves_onto_the_loop_while_its_last_run_was_quick_and_off_when_it_was_not() -> None:
    loop_thread = threading.get_ident()
    off_loop = asgi.OnLoopWhileQuick(limit_seconds=0.005)
    assert await off_loop(_busy, 0) != loop_thread  # first run: nothing known yet, so in a thread
    assert await off_loop(_busy, 0.02) == loop_thread  # the last one was quick
    assert off_loop.last_seconds is not None and off_loop.last_seconds >= 0.02
    assert await off_loop(_busy, 0) != loop_thread  # the last one was slow
    assert await off_loop(_busy, 0) == loop_thread
    try:
        await off_loop(divmod, 1, 0)
    except ZeroDivisionError:
        return
    raise AssertionError("the error of the work must reach the caller")
