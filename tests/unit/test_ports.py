"""``free_ports`` gives one job's servers distinct ports (ports taken one at a time could repeat: a peer
and the gradient function once shared one, and the peer never got its events)."""

from __future__ import annotations

import socket

from p2ptrain.redis_server import free_port, free_ports


def test_free_ports_are_distinct_and_free() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:  # each can be bound (nothing holds it after the call)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    assert 0 < free_port() < 65536
    assert free_ports(0) == []
