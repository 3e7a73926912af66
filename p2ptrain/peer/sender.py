"""The exchange's sending side: this peer's averaged gradient, encoded once, parked in its outbox and
posted to every other peer in the background until each takes it or the round deadline passes.

The sender owns its background tasks: ``drain`` waits for them, ``close`` cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque

import numpy as np

from p2ptrain import asgi, metrics, retry, wire
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.poster import Poster, PostError
from p2ptrain.store import PeerStore

log = logging.getLogger(__name__)

_SEND_BACKOFF = retry.Backoff(first=0.05, cap=1.0)
_POST_TIMEOUT_SECONDS = 10
# Post times kept for the end-of-run summary line (bench/call.py reads it): the latest ones suffice.
_POST_SECONDS_KEPT = 10_000


class GradientSender(PeerPart):
    def __init__(self, ctx: PeerContext, store: PeerStore, http: Poster) -> None:
        super().__init__(ctx)
        self.store = store
        self.http = http
        self._sending: set[asyncio.Task[None]] = set()
        self.post_seconds: deque[float] = deque(maxlen=_POST_SECONDS_KEPT)  # answered posts, request to reply

    async def send(self, round_index: int, gradient: np.ndarray, *, parked: bool = False) -> None:
        """Park the gradient in our outbox and start posting it to every other peer. ``parked``: Redis
        parked it already (``PeerStore.take_average``), as float32: an event by dataref needs no encoding."""
        exchange = self.spec.exchange
        size = wire.TENSOR_HEADER_BYTES + 4 * gradient.size  # float32, uncompressed: what a parked one is
        blob = b""
        if not parked or size <= exchange.inline_limit_bytes:
            blob = await asgi.off_loop_if_large(gradient.nbytes, wire.encode_tensor, gradient, exchange.dtype,
                                                exchange.compression)
            size = len(blob)
        extensions: dict[str, str | int] = {"round": round_index, "peer": self.index}
        data = blob
        # Always parked in our outbox: a peer that missed the event (it restarted, or could not be
        # reached) fetches it from there instead of closing the round without us. An event by dataref
        # needs it parked first; an event that carries the gradient goes out while it is parked (the
        # outbox is read only once a round's quorum or deadline is missed), saving the others a Redis
        # round trip of waiting every round.
        parking = asyncio.create_task(self._park(round_index, blob, parked))
        if size > exchange.inline_limit_bytes:
            key = await parking
            address = self.config.redis[self.index]
            extensions[wire.DATAREF_ATTRIBUTE] = f"redis://{address.host}:{address.port}/{key}"
            data = b""
        event = wire.build_event(
            wire.GRADIENT_AVERAGED,
            wire.peer_source(self.spec.namespace, self.spec.name, self.index),
            data=data,
            subject=f"round/{round_index}",
            extensions=extensions,
            key=self.secrets.signing_key,
        )
        headers, body = await asgi.off_loop_if_large(len(data), wire.to_http, event)
        others = self.destinations()
        # Delivered in the background (retried until the deadline): an unreachable peer must not hold
        # up our round, which only needs a quorum.
        for peer in others:
            sending = asyncio.create_task(self._post(peer, round_index, headers, body))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        metrics.child(metrics.EXCHANGE_SENT_BYTES_TOTAL, **self.labels).inc(size * len(others))
        await parking  # done already for an event by dataref

    async def _park(self, round_index: int, blob: bytes, parked: bool) -> str:
        if parked:
            return self.store.keys.outbox(round_index)
        key = await asyncio.to_thread(self.store.put_outbox, round_index, blob)
        self.cost.redis_bytes("outboxWritten", len(blob))
        return key

    def destinations(self) -> list[int]:
        """Who takes our gradient: every other peer (``p2ptrain.peer.ps_round`` sends to the aggregator)."""
        return [i for i in range(self.spec.peers) if i != self.index]

    def url_of(self, peer: int) -> str:
        return self.config.peer_urls[peer]

    async def _post(self, peer: int, round_index: int, headers: dict[str, str], body: bytes) -> None:
        deadline = time.monotonic() + self.spec.exchange.round_deadline_seconds
        attempt = 0
        last_error = ""
        while time.monotonic() < deadline:
            self.cost.peer_bytes("exchangeSent", len(body))  # every attempt puts the body on the wire
            try:
                started = time.perf_counter()
                response = await self.http.post(
                    self.url_of(peer) + "/", headers=headers, content=body, timeout=_POST_TIMEOUT_SECONDS
                )
                self.post_seconds.append(time.perf_counter() - started)
            except PostError as exc:
                last_error = str(exc)
                await retry.sleep_before_retry(_SEND_BACKOFF, attempt, deadline)
                attempt += 1
                continue
            if response.status >= 400 and response.status != 409:  # 409: it has it, or moved on
                self._failed(peer, round_index, "refused", f"HTTP {response.status}: {response.text[:200]}")
            return
        self._failed(peer, round_index, "unreachable", last_error or "no attempt before the deadline")

    def _failed(self, peer: int, round_index: int, reason: str, detail: str) -> None:
        metrics.EXCHANGE_SEND_FAILURES_TOTAL.labels(**self.labels, reason=reason).inc()
        self.status.send_failures += 1
        log.warning("peer %d did not take our round %d gradient (%s): %s", peer, round_index + 1, reason, detail,
                    extra={"reason": reason})

    async def drain(self) -> None:
        """Wait for the gradients still on their way (each bounded by the round deadline)."""
        if self._sending:
            await asyncio.wait(set(self._sending))
        if len(self.post_seconds) > 1:
            ms = sorted(1000 * s for s in self.post_seconds)
            deciles = statistics.quantiles(ms, n=10, method="inclusive")
            log.info("exchange posts: %d answered, median %.3f ms, p10 %.3f ms, p90 %.3f ms",
                     len(ms), statistics.median(ms), deciles[0], deciles[-1])

    async def close(self) -> None:
        """Cancel every send still running (the round failed or the peer is stopping)."""
        tasks = set(self._sending)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
