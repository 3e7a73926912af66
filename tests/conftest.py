"""Shared fixtures: real redis-server processes on free loopback ports, always stopped."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from p2ptrain.native import module_path
from p2ptrain.redis_server import RedisServer

# Hypothesis' default 200 ms deadline per example is a timing assertion, and on a shared, loaded machine
# a slow first example fails it without a fault: speed is measured in bench/, never asserted in tests.
settings.register_profile("p2ptrain", deadline=None)
settings.load_profile("p2ptrain")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server (no module loaded) on a free port with a random password."""
    with RedisServer(password=secrets.token_hex(16)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_module() -> Path:
    """The p2ptrain Redis module, built from the packaged C source (gcc is part of the set-up)."""
    path = module_path()
    assert path is not None, "the p2ptrain Redis module did not build: is gcc installed?"
    return path


@pytest.fixture(params=["module", "lua"])
def accumulating_redis(request: pytest.FixtureRequest, redis_module: Path) -> Iterator[tuple[str, RedisServer]]:
    """A real redis-server with the module loaded ("module") or without it ("lua")."""
    module = redis_module if request.param == "module" else None
    with RedisServer(password=secrets.token_hex(16), module=module) as server:
        yield request.param, server
