"""Shared fixtures: real redis-server processes on free loopback ports, always stopped."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from p2ptrain.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server (no module loaded) on a free port with a random password."""
    with RedisServer(password=secrets.token_hex(16)) as server:
        yield server
