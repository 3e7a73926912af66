"""Closing a round, the same for a peer and for the aggregator (topology ps): gradients the missing
senders left in their outboxes, who took part (metrics, status), the rule's combination of what arrived
(a rule that cannot run is a skipped update, counted), and the parameter hash after it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import numpy as np
import torch

from p2ptrain import asgi, metrics, retry
from p2ptrain.config import RuntimeConfig
from p2ptrain.peer.context import PeerContext, due
from p2ptrain.peer.recovery import OtherPeers
from p2ptrain.peer.replica import Replica, SkipUpdate

log = logging.getLogger(__name__)

_PEERS_BACKOFF = retry.Backoff(first=0.1, cap=0.1)


async def from_outboxes(ctx: PeerContext, others: OtherPeers, absent: list[int], round_index: int) -> dict[int, np.ndarray]:
    """The round's gradients that the ``absent`` senders parked in their outboxes (counted, logged)."""
    found = await asyncio.gather(*(asyncio.to_thread(others.fetch_outbox, p, round_index) for p in absent))
    recovered = {peer: gradient for peer, gradient in zip(absent, found, strict=True) if gradient is not None}
    for peer in recovered:
        ctx.status.recovered += 1
        metrics.GRADIENTS_RECOVERED_TOTAL.labels(**ctx.labels).inc()
        log.info("took peer %d's round %d gradient from its outbox", peer, round_index + 1)
    return recovered


def count_attendance(ctx: PeerContext, gradients: dict[int, np.ndarray]) -> None:
    """Metrics and status of who took part in the round: the rest were excluded by the deadline."""
    peers = ctx.spec.peers
    missing = peers - len(gradients)
    if missing:
        metrics.PEERS_EXCLUDED_TOTAL.labels(**ctx.labels, reason="deadline").inc(missing)
        ctx.status.count_excluded("deadline", missing)
    metrics.PEERS_ACTIVE.labels(**ctx.labels).set(len(gradients))
    metrics.record_excluded_rounds(ctx.labels, peers, gradients)


def combine(ctx: PeerContext, replica: Replica, gradients: dict[int, np.ndarray]) -> torch.Tensor | None:
    """The rule's combination of the gradients, or None (counted, logged) when the update is skipped.
    Blocking: run it in a worker thread, or on the loop when the gradients are small."""
    try:
        return replica.aggregate(gradients)
    except SkipUpdate as exc:
        metrics.UPDATES_SKIPPED_TOTAL.labels(**ctx.labels, reason=exc.reason).inc()
        metrics.PEERS_EXCLUDED_TOTAL.labels(**ctx.labels, reason="rule").inc(len(gradients))
        ctx.status.count_skipped_update(exc.reason)
        log.warning("%s; skipping this round's update", exc, extra={"reason": exc.reason})
        return None


async def record_hash(ctx: PeerContext, replica: Replica, round_index: int) -> None:
    """The hash of the parameters after round ``round_index``, in status and as gauges."""
    note_hash(ctx, round_index, await asgi.off_loop_if_large(4 * replica.numel, replica.params_hash))


def note_hash(ctx: PeerContext, round_index: int, digest: str) -> None:
    """Record the hash of the parameters after round ``round_index`` (on the event loop)."""
    ctx.status.record_params_hash(round_index + 1, digest)
    metrics.PARAMS_HASH.labels(**ctx.labels).set(int(digest[:12], 16))
    metrics.PARAMS_HASH_ROUND.labels(**ctx.labels).set(round_index + 1)


def evaluation_due(ctx: PeerContext, round_index: int, rounds: int) -> bool:
    return due(ctx.spec.evaluation.every_rounds, round_index, rounds)


async def wait_for_peers(http: httpx.AsyncClient, config: RuntimeConfig, index: int) -> None:
    """Start together: wait (up to one round deadline) until every other peer's endpoint answers."""
    pending = {i for i in range(config.spec.peers) if i != index}

    async def all_answer() -> bool:
        for i in list(pending):
            try:
                if (await http.get(config.peer_urls[i] + "/healthz", timeout=1)).status_code == 200:
                    pending.discard(i)
            except httpx.HTTPError:
                continue
        return not pending

    deadline = time.monotonic() + config.spec.exchange.round_deadline_seconds
    if not await retry.poll(all_answer, deadline=deadline, backoff=_PEERS_BACKOFF):
        log.warning("starting without peers %s: they did not answer in time", sorted(pending))
