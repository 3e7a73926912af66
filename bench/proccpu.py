"""CPU-seconds of this process's children (peers, function instances, Redis servers) and its own
(``runner``: the local runner's function front door and status polling), read from /proc.

The local runner starts every process of a job as a child of the process that runs it. A thread samples
each child's user + system time while it runs, so the CPU of a function instance that scales to zero
and exits is still counted (up to its last sample; an instance idles before it is stopped, so little is
lost). ``cpu_at(t)`` gives the totals at an earlier moment, to leave out the start-up of a job.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def classify(argv: list[str]) -> str:
    """peer / function / redis / other, from a child's command line (``python -m p2ptrain function``)."""
    if argv and Path(argv[0]).name.startswith("redis-server"):
        return "redis"
    if "p2ptrain" in argv:
        rest = argv[argv.index("p2ptrain") + 1:]
        for word in rest:
            if word in ("peer", "function"):
                return word
    return "other"


def _children(parent: int) -> list[int]:
    """The parent's child pids: each of its threads lists the children it forked (cheap, no /proc scan)."""
    pids: list[int] = []
    try:
        tasks = list(os.scandir(f"/proc/{parent}/task"))
    except OSError:
        return pids
    for task in tasks:
        try:
            pids += [int(pid) for pid in Path(task.path, "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return pids


def _cpu_seconds(pid: int) -> tuple[int, float] | None:
    """(start time, user + system seconds): the start time tells a reused pid from the process before."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class ChildCpu:
    """Samples the CPU time of this process's children every ``interval`` seconds while in a ``with``."""

    def __init__(self, interval: float = 0.1, parent: int | None = None,
                 kind_of: Callable[[list[str]], str] = classify) -> None:
        self.interval = interval
        self.parent = os.getpid() if parent is None else parent
        self.kind_of = kind_of
        self.kinds: dict[tuple[int, int], str] = {}
        # (pid, start time) -> [(wall time, cpu seconds)]
        self.samples: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="child-cpu", daemon=True)

    def __enter__(self) -> ChildCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now = time.time()
        own = _cpu_seconds(self.parent)  # the parent itself: the local runner (its front door, its polling)
        if own is not None:
            self.kinds[(self.parent, own[0])] = "runner"
            self.samples.setdefault((self.parent, own[0]), []).append((now, own[1]))
        for pid in _children(self.parent):
            read = _cpu_seconds(pid)
            if read is None:
                continue
            key = (pid, read[0])
            # Until a child has exec'd, its command line is still ours: look again while it reads "other".
            if self.kinds.get(key, "other") == "other":
                self.kinds[key] = self.kind_of(_argv(pid))
            self.samples.setdefault(key, []).append((now, read[1]))

    def cpu_at(self, when: float | None = None) -> dict[str, float]:
        """CPU-seconds by kind of child, as last sampled at or before ``when`` (the end when None)."""
        totals: dict[str, float] = {}
        for key, series in self.samples.items():
            seen = [cpu for t, cpu in series if when is None or t <= when]
            kind = self.kinds[key]
            totals[kind] = totals.get(kind, 0.0) + (seen[-1] if seen else 0.0)
        return totals
