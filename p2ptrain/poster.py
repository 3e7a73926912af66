"""The HTTP client of the hot paths: the peer's gradient function calls and gradient posts, and the
local activator's forwarding. Keep-alive HTTP/1.1 over aiohttp (C parser; already installed with kopf),
which costs a fraction of httpx's per-request CPU time (see docs/bench-call.md).

Replies are read whole into a small immutable :class:`Reply`; every way a request can fail to get one
(connection refused or reset, timeout, malformed reply) raises :class:`PostError`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any


class PostError(Exception):
    """No reply: the connection failed, broke, or timed out. ``connect`` is True when it was never made."""

    def __init__(self, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.connect = connect


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class Poster:
    """A pool of keep-alive connections; create and close it inside one event loop."""

    def __init__(self, *, max_connections: int = 64, timeout_seconds: float = 60.0) -> None:
        self.max_connections = max_connections
        self.timeout_seconds = timeout_seconds
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=None, use_dns_cache=True)
            # No cookies, no proxies from the environment, no decompression of bodies we pass on as-is.
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        return self._session

    async def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, content: bytes = b"",
        timeout: float | None = None,
    ) -> Reply:
        import aiohttp

        session = self._open()
        limit = aiohttp.ClientTimeout(total=timeout if timeout is not None else self.timeout_seconds)
        try:
            async with session.request(method, url, headers=headers, data=content or None, timeout=limit) as response:
                body = await response.read()
                names = {k.lower(): v for k, v in response.headers.items()}
                return Reply(response.status, names, body)
        except aiohttp.ClientConnectorError as exc:
            raise PostError(f"ConnectError: {exc}", connect=True) from exc
        except TimeoutError as exc:
            raise PostError(f"Timeout: no reply from {url} within {limit.total}s") from exc
        except aiohttp.ClientError as exc:
            raise PostError(f"{type(exc).__name__}: {exc}") from exc

    async def post(self, url: str, *, headers: dict[str, str], content: bytes, timeout: float | None = None) -> Reply:
        return await self.request("POST", url, headers=headers, content=content, timeout=timeout)

    async def get(self, url: str, *, timeout: float | None = None) -> Reply:
        return await self.request("GET", url, timeout=timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            await asyncio.sleep(0)  # aiohttp's advice: one loop turn lets the transports close before the loop ends

    async def __aenter__(self) -> Poster:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
