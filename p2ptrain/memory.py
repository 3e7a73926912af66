"""glibc's allocator, set to reuse the memory of large buffers instead of returning it to the kernel.

A round allocates and frees buffers the size of the model many times over: each Redis GET of a
model or gradient, each decoded event, each torch tensor the rule or the optimizer makes. glibc
serves an allocation above ``M_MMAP_THRESHOLD`` (128 KiB at first, raised as such blocks are freed)
with a fresh ``mmap`` and unmaps it on free, and trims the heap's free top above
``M_TRIM_THRESHOLD``: so the next buffer of that size touches fresh pages again, a page fault for
every 4 KiB. On this machine (a virtual machine) that made a 4.5 MB Redis GET cost 12 ms of CPU
instead of 1.6 ms (bench: docs/design-notes.md). With both thresholds raised, freed buffers stay in
the heap and are reused: a process's resident memory stays at its high-water mark instead of falling
back after each round, which a pod's memory limit has to allow for anyway.

Redis (jemalloc) gets the same treatment through its environment, ``redis_allocator_env``: jemalloc
purges freed pages after 10 s by default, but pages of freed values of 8 MB and more at once, so
every 40 MB model (10^7 parameters) that crossed it was faulted in again: 96 ms of Redis CPU for a
SET and two GETs of 40 MB, 33-35 ms with purging off (values up to 4.5 MB: no difference).

The settings are glibc's ``mallopt``; the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` are glibc's own way to choose other values, and when either is set it is
left alone. Elsewhere (another C library) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20  # allocations above this still get their own mapping
TRIM_THRESHOLD_BYTES = 1 << 30  # free heap top kept for reuse, up to this
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# jemalloc's options for redis-server: never purge freed pages (its resident memory stays at its high-water
# mark). MALLOC_CONF for a system jemalloc (Debian's redis-server, p2ptrain's image), JE_MALLOC_CONF for the
# one Redis bundles with its je_ prefix (the official redis images).
REDIS_MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
REDIS_ENV_VARS = ("MALLOC_CONF", "JE_MALLOC_CONF")


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    if any(name in os.environ for name in ENV_VARS):
        return False  # the operator of this process chose glibc's settings
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.debug("mallopt refused the allocator settings; keeping the C library's defaults")
    return done


def redis_allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to a redis-server's environment ``environ`` (none where one is already set:
    whoever runs it chose jemalloc's options)."""
    if any(name in environ for name in REDIS_ENV_VARS):
        return {}
    return dict.fromkeys(REDIS_ENV_VARS, REDIS_MALLOC_CONF)
