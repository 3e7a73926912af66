"""Reading other peers' Redis, and this peer's own checkpoint: the claim-checked gradients of large
events (``dataref``), gradients whose events were missed (the senders' outboxes), and the state a
restarted or late peer resumes from (its own checkpoint) or catches up to (the others' checkpoints).

All of it is blocking Redis I/O and tensor work: callers run these methods in a worker thread.
"""

from __future__ import annotations

import logging
from typing import cast
from urllib.parse import urlparse

import numpy as np
import redis

from p2ptrain import metrics, wire
from p2ptrain.checkpoint import CheckpointError, median_state
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.replica import Replica
from p2ptrain.store import Keys, PeerStore, checkpoint_round, connect, read_checkpoint

log = logging.getLogger(__name__)


class OtherPeers(PeerPart):
    """One shared client per other peer's Redis, only at the job's own addresses."""

    def __init__(self, ctx: PeerContext, numel: int) -> None:
        super().__init__(ctx)
        self.numel = numel
        self._clients: dict[int, redis.Redis] = {}

    @property
    def max_body_bytes(self) -> int:
        return max(self.spec.exchange.inline_limit_bytes, 4 * self.numel) + 64 * 1024

    def decode_gradient(self, blob: bytes | bytearray, *, reuse: bool = False) -> np.ndarray:
        """A peer's gradient (inline, by dataref or from its outbox), checked against this model;
        ``reuse``: ``blob`` is a received ``bytearray`` nothing else holds, decoded in place."""
        return wire.decode_tensor(blob, expected_numel=self.numel, max_bytes=self.max_body_bytes + 4 * self.numel,
                                  reuse=reuse)

    def client(self, peer: int) -> redis.Redis:
        client = self._clients.get(peer)
        if client is None:
            client = connect(self.config.redis[peer], self.secrets.redis_password, socket_timeout=30)
            self._clients[peer] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def fetch_dataref(self, sender: int, dataref: str) -> bytes | bytearray:
        """Claim check: fetch a large gradient from the sender's Redis, only from the job's own servers."""
        url = urlparse(dataref)
        expected = self.config.redis[sender]
        key = url.path.lstrip("/")
        if url.scheme != "redis" or url.hostname != expected.host or url.port != expected.port:
            raise wire.WireError("dataref", f"dataref {dataref!r} does not point at peer {sender}'s Redis")
        if not Keys(self.spec.name, sender).is_outbox(key):
            raise wire.WireError("dataref", f"dataref key {key!r} is not peer {sender}'s outbox")
        try:
            blob = cast(bytes | bytearray | None, self.client(sender).get(key))
        except redis.RedisError as exc:
            raise wire.WireError("dataref", f"cannot read dataref from peer {sender}'s Redis: {exc}") from exc
        if blob is None:
            raise wire.WireError("dataref", f"dataref {key} has expired or was never written")
        self.cost.peer_bytes("datarefFetched", len(blob))
        return blob  # a large one as received (p2ptrain.bulkread): a bytearray, not copied

    def fetch_outbox(self, peer: int, round_index: int) -> np.ndarray | None:
        """Another peer's gradient for a round, from the outbox in its Redis; None if not there (yet).

        An outbox entry that fails validation may come from a Byzantine peer: it is counted and logged
        as a warning, never used.
        """
        try:
            blob = cast(bytes | bytearray | None, self.client(peer).get(Keys(self.spec.name, peer).outbox(round_index)))
        except redis.RedisError as exc:
            log.info("cannot read peer %d's outbox for round %d: %s", peer, round_index + 1, exc)
            return None
        if blob is None:
            return None
        self.cost.peer_bytes("outboxFetched", len(blob))
        try:
            return self.decode_gradient(blob, reuse=True)
        except wire.WireError as exc:
            metrics.OUTBOX_GRADIENTS_INVALID_TOTAL.labels(**self.labels, reason=exc.reason).inc()
            log.warning("peer %d's round %d gradient in its outbox is invalid: %s", peer, round_index + 1, exc,
                        extra={"reason": exc.reason})
            return None

    def catch_up(self, replica: Replica, start: int) -> int:
        """Start from the other peers' state when they are ahead (a restarted or late peer).

        Reads the latest checkpoint in every other peer's Redis (the claim-check path; it works while
        those peers are busy training). With a Byzantine budget f, a round counts as reached only when
        f+1 peers report it, and with 2f+1 checkpoints the adopted state is their coordinate-wise median,
        so f lying peers can neither drag nor poison a restarting one. Returns the round to start at.
        """
        # Rounds first (a few bytes each): the states are read only when this peer is behind.
        rounds_of: dict[int, int] = {}
        for peer in range(self.spec.peers):
            if peer == self.index:
                continue
            try:
                reached_by_peer = checkpoint_round(self.client(peer), Keys(self.spec.name, peer))
            except redis.RedisError as exc:
                log.info("cannot read peer %d's checkpoint: %s", peer, exc)
                continue
            if reached_by_peer is not None:
                rounds_of[peer] = reached_by_peer
        byzantine = self.spec.aggregation.byzantine
        rounds = sorted(rounds_of.values(), reverse=True)
        if len(rounds) <= byzantine or rounds[byzantine] < start:
            return start  # nobody (trustworthy) is ahead of us
        robust = byzantine > 0 and len(rounds_of) >= 2 * byzantine + 1
        wanted = sorted(rounds_of) if robust else [max(rounds_of, key=lambda p: rounds_of[p])]
        candidates: list[tuple[int, int, bytes]] = []
        for peer in wanted:
            try:
                saved = read_checkpoint(self.client(peer), Keys(self.spec.name, peer))
            except redis.RedisError as exc:
                log.info("cannot read peer %d's checkpoint: %s", peer, exc)
                continue
            if saved is not None:
                candidates.append((peer, saved[0], saved[1]))
        if not candidates:
            return start
        if robust:
            state = median_state([c[2] for c in candidates])
            reached = sorted(c[1] for c in candidates)[(len(candidates) - 1) // 2]
            source = f"the median of peers {[c[0] for c in candidates]}"
        else:
            peer, reached, state = candidates[0]
            source = f"peer {peer}"
        try:
            replica.load(state)
        except CheckpointError as exc:
            log.warning("cannot adopt the other peers' state, continuing from round %d: %s", start, exc)
            return start
        log.info("caught up: adopted the state after round %d from %s", reached + 1, source,
                 extra={"skipped_rounds": reached + 1 - start})
        self.status.caught_up = {"from": start, "to": reached + 1}
        metrics.CATCH_UPS_TOTAL.labels(**self.labels).inc()
        return reached + 1


def resume(store: PeerStore, replica: Replica, address: object) -> int:
    """The round to continue at after the last checkpoint in this peer's Redis (0 without one)."""
    try:
        saved = store.load_checkpoint()
    except redis.RedisError as exc:
        raise PeerError(f"cannot reach this peer's Redis at {address}: {exc}") from exc
    if saved is None:
        return 0
    round_index, state, _ = saved
    try:
        replica.load(state)
    except CheckpointError as exc:
        log.warning("ignoring checkpoint: %s", exc)
        return 0
    log.info("resumed from checkpoint", extra={"round": round_index})
    return round_index + 1
