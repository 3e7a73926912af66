"""The trust boundary of the exchange: a peer's averaged gradient event is decoded, checked (signature,
type, sender, round window, duplicate, size, shape, finiteness, dataref) and filed in the inbox, or
rejected with a counted reason. Signature checks and tensor decoding of a large event run in a worker
thread; a small one's run on the loop, where they cost less than the hop (``asgi.off_loop_if_large``)."""

from __future__ import annotations

import asyncio
import functools
import logging

from p2ptrain import asgi, metrics, wire
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.inbox import Inbox
from p2ptrain.peer.recovery import OtherPeers

log = logging.getLogger(__name__)

# Gradients for rounds this far ahead of ours are buffered (faster peers); further ones are refused.
ROUND_WINDOW = 4
REJECT_STATUS = {"signature": 401, "stale": 409, "duplicate": 409, "oversize": 413, "content-type": 415}


class EventReceiver(PeerPart):
    def __init__(self, ctx: PeerContext, inbox: Inbox, others: OtherPeers) -> None:
        super().__init__(ctx)
        self.inbox = inbox
        self.others = others

    @property
    def max_body_bytes(self) -> int:
        return self.others.max_body_bytes

    async def receive(self, headers: dict[str, str], body: bytes | None) -> tuple[int, str, str]:
        """Decode, validate and file a peer's averaged gradient. Returns (status, reason, message)."""
        try:
            if body is None:
                raise wire.WireError("oversize", f"event body exceeds {self.max_body_bytes} bytes")
            self.cost.peer_bytes("exchangeReceived", len(body))
            event = await asgi.off_loop_if_large(len(body), self._verified_event, headers, body)
            sender, round_index = self._sender_and_round(event)
            self._check_window(sender, round_index)
            dataref = event.get_extension(wire.DATAREF_ATTRIBUTE)
            payload: bytes | bytearray
            if dataref:  # fetched into a buffer of its own: decoded in place
                payload = await asyncio.to_thread(self.others.fetch_dataref, sender, str(dataref))
            else:
                payload = wire.event_bytes(event)
            decode = functools.partial(self.others.decode_gradient, payload, reuse=bool(dataref))
            gradient = await asgi.off_loop_if_large(len(payload), decode)
            if not await self.inbox.file(round_index, sender, gradient):
                # Checked again at filing: the same event may have been in flight twice while decoding.
                raise wire.WireError("duplicate", f"peer {sender} already sent its round {round_index} gradient")
        except wire.WireError as exc:
            metrics.EVENTS_REJECTED_TOTAL.labels(**self.labels, reason=exc.reason).inc()
            self.status.count_rejected(exc.reason)
            log.warning("rejected event: %s", exc, extra={"reason": exc.reason})
            return REJECT_STATUS.get(exc.reason, 400), exc.reason, f"{exc.reason}: {exc}"
        metrics.child(metrics.EXCHANGE_RECEIVED_BYTES_TOTAL, **self.labels).inc(len(payload))
        return 202, "accepted", "accepted"

    def _verified_event(self, headers: dict[str, str], body: bytes) -> wire.Incoming:
        event = wire.from_http(headers, body, data_content_types=(wire.OCTET_STREAM,))
        wire.verify(event, self.secrets.signing_key)
        if event.get_type() != wire.GRADIENT_AVERAGED:
            raise wire.WireError("malformed", f"unexpected event type {event.get_type()!r}")
        return event

    def _check_window(self, sender: int, round_index: int) -> None:
        current = self.inbox.current_round
        if round_index < current:
            raise wire.WireError("stale", f"gradient for round {round_index} from peer {sender} came after it closed")
        if round_index > current + ROUND_WINDOW:
            raise wire.WireError("stale", f"gradient for round {round_index} is too far ahead of round {current}")
        if self.inbox.holds(round_index, sender):
            raise wire.WireError("duplicate", f"peer {sender} already sent its round {round_index} gradient")

    def _sender_and_round(self, event: wire.Incoming) -> tuple[int, int]:
        try:
            sender = int(event.get_extension("peer"))
            round_index = int(event.get_extension("round"))
        except (TypeError, ValueError) as exc:
            raise wire.WireError("malformed", "event needs integer 'peer' and 'round' extensions") from exc
        if not 0 <= sender < self.spec.peers or sender == self.index:
            raise wire.WireError("unknown-peer", f"peer {sender} is not another peer of this job")
        if event.get_source() != wire.peer_source(self.spec.namespace, self.spec.name, sender):
            raise wire.WireError("unknown-peer", f"source {event.get_source()!r} does not match peer {sender}")
        return sender, round_index
