"""redis-py's RESP parser, reading large bulk strings (models, gradients) straight into one buffer.

redis-py receives every reply through a ``BytesIO`` in 64 KiB ``recv`` calls, then copies a value out
of it, and twice more when the value did not fit what was buffered (``data += ...``, ``data[:-2]``).
For a 4.5 MB GET that is 1.6 ms of CPU here; received with ``recv_into`` into a buffer sized from the
reply's length, 0.84 ms (docs/design-notes.md), and handed over as that ``bytearray``: no copy into a
``bytes`` (each was another 0.3-0.5 ms of a 4.5 MB value), and writable, so ``wire.decode_tensor(...,
reuse=True)`` can view it as the float32 array without copying it again. Only
bulk strings of at least ``DIRECT_BYTES`` take this path (callers of large values take ``bytes |
bytearray``); everything else (small values, other reply
types, error replies, the handshake) is redis-py's own code, and so are disconnects: a timeout or a
closed socket in the middle of a value raises redis-py's ``TimeoutError`` / ``ConnectionError``, and
redis-py drops that connection as it does for its own reads.

It subclasses redis-py internals (``redis._parsers``), so ``PARSER`` is None where they are not as
expected and clients keep redis-py's parser; ``store.connect`` installs it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Below this a value is read as redis-py reads it: the copies of a small value cost less than the calls.
DIRECT_BYTES = 256 * 1024


def _parser() -> type | None:
    try:
        from redis._parsers import _RESP3Parser
        from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR, SocketBuffer
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from redis.utils import SENTINEL
    except ImportError as exc:  # another redis-py layout: its own parser it is
        log.debug("redis-py's parser internals differ (%s); large values are read by redis-py", exc)
        return None

    class DirectBuffer(SocketBuffer):
        def read(self, length: int, timeout: Any = SENTINEL) -> bytes:
            if length < DIRECT_BYTES:
                return super().read(length, timeout)
            out = bytearray(length)
            crlf = bytearray(2)
            sock = self._sock
            if timeout is not SENTINEL:
                sock.settimeout(timeout)
            try:
                for target in (memoryview(out), memoryview(crlf)):  # the value, then its CRLF
                    have = self._buffer.readinto(target)  # what the last recv already brought in
                    while have < len(target):
                        received = sock.recv_into(target[have:])
                        if received == 0:
                            raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                        have += received
            except TimeoutError as exc:  # socket.timeout
                raise RedisTimeoutError("Timeout reading from socket") from exc
            finally:
                if timeout is not SENTINEL:
                    sock.settimeout(self.socket_timeout)
            if crlf != b"\r\n":
                raise RedisConnectionError(f"a bulk string of {length} bytes is not followed by CRLF")
            return out  # type: ignore[return-value]  # a bytearray, the caller's: bytes' API, writable

    class DirectBulkParser(_RESP3Parser):
        buffer_class = DirectBuffer

        def on_connect(self, connection: Any) -> None:
            super().on_connect(connection)
            self._buffer = DirectBuffer(connection._sock, self.socket_read_size, connection.socket_timeout)

    return DirectBulkParser


PARSER = _parser()
