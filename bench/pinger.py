"""PING a Redis server back to back from its own process and record every round trip.

Used by bench/accumulate.py and tests/integration/test_module_ops.py to see whether Redis answers
other clients while a long module operation runs. A separate process, so the measuring client never
waits on the Python GIL of the one sending the operation. Reads the password from stdin's first line
(never from argv), prints ``ready``, pings until stdin closes, then prints one JSON line:
``[[sent, answered], ...]`` in ``time.monotonic()`` seconds (one clock for every process on Linux).
Usage: ``python bench/pinger.py HOST PORT``.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    password = sys.stdin.readline().strip()
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    auth = f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n".encode()
    sock.sendall(auth)
    if not sock.recv(64).startswith(b"+OK"):
        print("AUTH failed", file=sys.stderr)
        return 1
    print("ready", flush=True)
    samples: list[tuple[float, float]] = []
    while not select.select([sys.stdin], [], [], 0)[0]:
        sent = time.monotonic()
        sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(64)
        samples.append((sent, time.monotonic()))
    print(json.dumps(samples), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
