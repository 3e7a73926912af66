"""p2ptrain.memory: freed model-sized buffers are reused, not faulted in again (a real glibc process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from p2ptrain import memory

# A round's pattern in small: several model-sized buffers alive at once, then freed; again and again.
_CHILD = """
import json, resource, sys
from p2ptrain import memory
applied = memory.keep_freed_buffers() if sys.argv[1] == "on" else False
def round_():
    buffers = [b"\\x01" * (8 << 20) for _ in range(6)]  # written: every page touched
    return sum(len(b) for b in buffers)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""
_PAGES_PER_ROUND = 6 * (8 << 20) // 4096


def _run(mode: str, **env: str) -> dict[str, int | bool]:
    clean = {k: v for k, v in os.environ.items() if k not in memory.ENV_VARS}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_freed_buffers_are_reused_instead_of_faulted_in_every_round() -> None:
    default = _run("off")
    kept = _run("on")
    assert kept["applied"] is True
    # glibc's defaults give the pages back and fault them in again each round: the case this fixes.
    assert default["faults"] > 5 * _PAGES_PER_ROUND, default
    assert kept["faults"] < _PAGES_PER_ROUND // 10, kept


def test_glibcs_own_settings_from_the_environment_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    assert memory.keep_freed_buffers() is False
    chosen = _run("on", MALLOC_TRIM_THRESHOLD_=str(128 << 10), MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    assert chosen["applied"] is False and chosen["faults"] > 5 * _PAGES_PER_ROUND, chosen


def test_redis_servers_keep_freed_pages(redis_server) -> None:
    """The local runner's (and the tests') redis-server: jemalloc never purges, so a model-sized value
    written after another was deleted reuses its pages (real redis-server; jemalloc reports its options)."""
    stats = redis_server.client().execute_command("MEMORY", "MALLOC-STATS").decode()
    assert "opt.dirty_decay_ms: -1" in stats and "opt.muzzy_decay_ms: -1" in stats


def test_the_allocator_settings_of_whoever_runs_redis_win() -> None:
    assert memory.redis_allocator_env({}) == {"MALLOC_CONF": memory.REDIS_MALLOC_CONF,
                                              "JE_MALLOC_CONF": memory.REDIS_MALLOC_CONF}
    assert memory.redis_allocator_env({"MALLOC_CONF": "narenas:1"}) == {}
    assert memory.redis_allocator_env({"JE_MALLOC_CONF": "narenas:1"}) == {}
