"""A peer's side of ``topology: ps``: its averaged gradient goes to the aggregator only, and the model
of the next round is read from the aggregator's Redis instead of being aggregated here.

The peer pulls (polls the aggregator's checkpoint round) rather than being pushed an event: the
aggregator then never needs to reach the peers, a restarted aggregator has nothing to re-deliver,
and the state the peers load is exactly the checkpoint a restarted aggregator resumes from — one
copy of the truth, read atomically (``store.read_checkpoint``). See docs/topology.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import cast

import numpy as np
import redis

from p2ptrain import metrics, retry
from p2ptrain.checkpoint import CheckpointError
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.replica import Replica
from p2ptrain.peer.sender import GradientSender
from p2ptrain.store import Keys, checkpoint_round, connect, read_checkpoint

log = logging.getLogger(__name__)

# Beyond one round deadline (the aggregator closing the round), how long a peer waits for the
# aggregator's model of a round — its restart included — before failing: the bound a peer also
# gives its own Redis (``round.REDIS_OUTAGE_SECONDS``).
AGGREGATOR_OUTAGE_SECONDS = 120.0
_POLL = retry.Backoff(first=0.01, cap=0.1)


def aggregator_keys(job: str, peers: int) -> Keys:
    """The aggregator's keys in its own Redis: it files under index ``peers`` (after the peers')."""
    return Keys(job, peers)


def aggregator_labels(job: str, namespace: str) -> dict[str, str]:
    """The aggregator's metric labels: the peers' metric names, with ``peer="aggregator"``."""
    return {"job": job, "namespace": namespace, "peer": "aggregator"}


class AggregatorSender(GradientSender):
    """The exchange's sending side in ps mode: parked in the outbox as usual, posted to the aggregator."""

    def destinations(self) -> list[int]:
        return [self.spec.peers]

    def url_of(self, peer: int) -> str:
        assert self.config.aggregator_url is not None, "RuntimeConfig checks it for topology ps"
        return self.config.aggregator_url


class AggregatorLink(PeerPart):
    """The aggregator's Redis as a peer reads it (blocking client, used from worker threads)."""

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        address = self.config.aggregator_redis
        assert address is not None, "RuntimeConfig checks it for topology ps"
        self.address = address
        self.keys = aggregator_keys(self.spec.name, self.spec.peers)
        self.wait_seconds = self.spec.exchange.round_deadline_seconds + AGGREGATOR_OUTAGE_SECONDS

    def _client(self) -> redis.Redis:
        # One connection per use (a round, a catch-up): nothing for the peer to close, and a
        # restarted aggregator Redis is simply connected to again.
        return connect(self.address, self.secrets.redis_password, socket_timeout=10)

    async def exchange(self, round_index: int, own: np.ndarray | None, sender: GradientSender,
                       replica: Replica) -> tuple[int, int]:
        """Send our gradient (if any) and adopt the aggregator's model after ``round_index`` or a later
        round (this peer fell behind). Returns (the round adopted, the gradients it aggregated)."""
        if own is not None:
            await sender.send(round_index, own)
        deadline, attempt = time.monotonic() + self.wait_seconds, 0
        while True:
            reached = await self._wait_for_round(round_index)
            adopted = await asyncio.to_thread(self._adopt, replica, reached)
            if adopted is not None:
                return adopted
            # Its Redis restarted empty between the two reads: the aggregator publishes the round again
            # once it has resumed (from the peers' checkpoints), so wait for it as before.
            if time.monotonic() >= deadline:
                raise PeerError(f"the aggregator's checkpoint after round {reached + 1} kept vanishing from "
                                f"{self.address} for {self.wait_seconds:.0f}s")
            if attempt == 0:
                log.warning("the aggregator's checkpoint after round %d vanished from %s; waiting for it again",
                            reached + 1, self.address)
            await retry.sleep_before_retry(_POLL, attempt, deadline)
            attempt += 1

    def catch_up(self, replica: Replica, start: int) -> int:
        """A (re)started peer: the round after the aggregator's latest model, adopted; else ``start``."""
        try:
            with contextlib.closing(self._client()) as client:
                reached = checkpoint_round(client, self.keys)
        except redis.RedisError as exc:
            log.info("cannot read the aggregator's Redis at %s: %s", self.address, exc)
            return start
        if reached is None or reached < start:
            return start
        adopted_now = self._adopt(replica, reached)
        if adopted_now is None:
            return start
        adopted = adopted_now[0]
        if adopted + 1 > start:
            self.status.caught_up = {"from": start, "to": adopted + 1}
            metrics.CATCH_UPS_TOTAL.labels(**self.labels).inc()
            log.info("caught up: adopted the aggregator's model after round %d", adopted + 1)
        return adopted + 1

    async def _wait_for_round(self, round_index: int) -> int:
        with contextlib.closing(self._client()) as client:  # redis-py reconnects it after an outage
            return await self._poll_round(client, round_index)

    async def _poll_round(self, client: redis.Redis, round_index: int) -> int:
        deadline = time.monotonic() + self.wait_seconds
        reached: int | None = None
        failure = ""

        async def published() -> bool:
            nonlocal reached, failure
            try:
                reached = await asyncio.to_thread(checkpoint_round, client, self.keys)
            except redis.RedisError as exc:
                if not failure:
                    log.warning("cannot read the aggregator's Redis at %s in round %d: %s; retrying",
                                self.address, round_index + 1, exc)
                failure = str(exc)
                self.status.message = f"waiting for the aggregator's Redis at {self.address}"
                return False
            return reached is not None and reached >= round_index

        if not await retry.poll(published, deadline=deadline, backoff=_POLL):
            raise PeerError(
                f"the aggregator published no model for round {round_index + 1} within {self.wait_seconds:.0f}s "
                f"(exchange.roundDeadlineSeconds + {AGGREGATOR_OUTAGE_SECONDS:.0f}s); its Redis at {self.address}"
                + (f" answered: {failure}" if failure else " answered, with an older round")
            )
        self.status.message = ""
        return cast(int, reached)

    def _adopt(self, replica: Replica, reached: int) -> tuple[int, int] | None:
        """(the round adopted, the gradients it aggregated); None when the checkpoint is gone: the
        aggregator's Redis restarted empty after ``reached`` was read."""
        with contextlib.closing(self._client()) as client:
            saved = read_checkpoint(client, self.keys)
        if saved is None:
            return None
        round_index, state, meta = saved
        self.cost.redis_bytes("checkpointRead", len(state))
        try:
            replica.load(state)
        except CheckpointError as exc:
            raise PeerError(f"the aggregator's checkpoint after round {round_index + 1} cannot be loaded: {exc}") from exc
        return round_index, int(meta.get("peersUsed", 0))
