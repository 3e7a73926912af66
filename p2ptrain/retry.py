"""One backoff policy for every retry and poll loop: exponential delays with a cap, optional jitter,
bounded by a deadline on the monotonic clock (in the style of kopf's ``throttled(delays=...)``)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

_MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``n+1``: ``first * factor**n``, at most ``cap``; jitter spreads retries
    of many callers (micro-batches hitting one function after a crash) over up to twice the delay."""

    first: float = 0.1
    cap: float = 2.0
    factor: float = 2.0
    jitter: bool = False

    def delay(self, attempt: int) -> float:
        # The exponent is bounded: a long poll (a peer waiting minutes for the ps aggregator) makes
        # thousands of attempts, and factor**attempt would overflow a float.
        base = min(self.first * self.factor ** min(attempt, _MAX_EXPONENT), self.cap)
        return base * (1 + random.random()) if self.jitter else base


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def sleep_before_retry(backoff: Backoff, attempt: int, deadline: float) -> None:
    """Wait the backoff delay, never past ``deadline``."""
    await asyncio.sleep(min(backoff.delay(attempt), remaining(deadline)))


async def poll(check: Callable[[], Awaitable[bool]], *, deadline: float, backoff: Backoff) -> bool:
    """Call ``check`` until it returns True (then True) or ``deadline`` passes (then False)."""
    attempt = 0
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await sleep_before_retry(backoff, attempt, deadline)
        attempt += 1


class NotReady(Exception):
    """A started process did not become ready: it exited first, or the deadline passed."""

    def __init__(self, message: str, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def wait_until_ready(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, *, timeout: float, interval: float = 0.1
) -> float:
    """Poll ``ready`` until it returns True; the seconds it took. ``NotReady`` (naming ``what``) if
    ``process`` exits first or ``timeout`` passes. ``ready`` must not raise for "not yet"."""
    started = time.monotonic()
    deadline = started + timeout
    while not ready():
        if process.poll() is not None:
            raise NotReady(f"{what}: the process exited with status {process.returncode} first", exited=True)
        if time.monotonic() >= deadline:
            raise NotReady(f"{what}: not within {timeout:g} s", exited=False)
        time.sleep(min(interval, remaining(deadline)))
    return time.monotonic() - started


def poll_blocking(check: Callable[[], bool], *, deadline: float, backoff: Backoff) -> bool:
    """``poll`` for blocking code (run in a worker thread)."""
    attempt = 0
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(backoff.delay(attempt), remaining(deadline)))
        attempt += 1
