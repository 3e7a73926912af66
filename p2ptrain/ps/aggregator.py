"""The aggregator of ``topology: ps``: a parameter server with its own Redis.

Each round it takes every peer's averaged gradient (the same signed ``gradient.averaged`` events the
peers swap in ``p2p``, through the same receiver and inbox), closes the round on a quorum, when every
missing peer has moved past it, or ``exchange.roundDeadlineSeconds`` after the round's first gradient,
aggregates with the configured rule, takes the optimizer step and checkpoints model and optimizer to
its Redis. The peers read that checkpoint as the next round's model (``p2ptrain.peer.ps_round``).

A restarted aggregator resumes from its checkpoint; one whose Redis came back empty adopts the
peers' checkpoints (they hold its last model). Gradients sent while it was down reach it on the
senders' retries, or from the peers' outboxes. See docs/topology.md.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch

from p2ptrain import metrics
from p2ptrain.aggregate import all_finite
from p2ptrain.config import RuntimeConfig, Secrets
from p2ptrain.data import shard_indices
from p2ptrain.peer import closing
from p2ptrain.peer.context import PeerContext
from p2ptrain.peer.divergence import Diverged
from p2ptrain.peer.endpoint import PeerEndpoint
from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.inbox import Inbox
from p2ptrain.peer.ps_round import aggregator_keys, aggregator_labels
from p2ptrain.peer.receiver import EventReceiver
from p2ptrain.peer.recovery import OtherPeers, resume
from p2ptrain.peer.replica import Replica
from p2ptrain.peer.report import RoundReport, record_round
from p2ptrain.status import PeerState, PeerStatus
from p2ptrain.store import PeerStore, connect

log = logging.getLogger(__name__)

# How often the wait for a round's gradients looks whether the first one has arrived (the deadline
# runs from then); the round itself closes as soon as the inbox says so.
_WAIT_SLICE_SECONDS = 0.5


class AggregatorContext(PeerContext):
    """A ``PeerContext`` whose metric labels say ``peer="aggregator"``: the peers' metric names."""

    def metric_labels(self) -> dict[str, str]:
        return aggregator_labels(self.spec.name, self.spec.namespace)


class Aggregator:
    def __init__(self, config: RuntimeConfig, secrets: Secrets) -> None:
        spec = config.spec
        if spec.topology != "ps" or config.aggregator_redis is None:
            raise PeerError(f"job {spec.name!r} has topology {spec.topology!r}: only topology ps has an aggregator")
        self.config = config
        self.spec = spec
        self.index = spec.peers  # after the peers': its inbox waits for all of them, its keys are its own
        self.status = PeerStatus(peer=self.index)
        self.ctx = AggregatorContext(config, self.index, secrets, self.status)
        self.labels = self.ctx.labels
        self.replica = Replica(spec)
        # Worker momentum is the peers' own (they adopt this state every round and keep theirs).
        self.replica.momentum = None
        samples = len(self.replica.dataset.y_train)
        # The longest peer's run (shards differ by at most one sample): no peer waits for a round never served.
        self.rounds = max(
            spec.total_rounds(len(shard_indices(samples, spec.peers, i, spec.dataset.split_seed)))
            for i in range(spec.peers)
        )
        self.status.rounds = self.rounds
        self.address = config.aggregator_redis
        self.redis = connect(self.address, secrets.redis_password, socket_timeout=60)
        self.store = PeerStore(
            self.redis, aggregator_keys(spec.name, spec.peers),
            accumulator_mode=spec.redis.accumulator, key_ttl_seconds=spec.redis.key_ttl_seconds,
        )
        self.inbox = Inbox(spec.peers, self.index)
        # Rounds before this one may have gone to an aggregator that was lost: their outboxes are read
        # as the round opens (set when resuming, see ``run``).
        self._outboxes_first_until = 0
        self.others = OtherPeers(self.ctx, self.replica.numel)
        self.receiver = EventReceiver(self.ctx, self.inbox, self.others)
        self.app = PeerEndpoint(spec, self.status, self.receiver, self.replica)

    async def run(self) -> list[RoundReport]:
        """Serve every round; resumes from its checkpoint, or from the peers' when its Redis is empty."""
        reports: list[RoundReport] = []
        try:
            start = await asyncio.to_thread(resume, self.store, self.replica, self.address)
            # The peers sent the round in progress (and, after a catch-up, every round since their
            # checkpoints: up to checkpointEveryRounds) to the aggregator that was lost, and wait.
            behind = 1
            if start == 0:
                start = await asyncio.to_thread(self.others.catch_up, self.replica, start)
                behind = self.spec.training.checkpoint_every_rounds
                if start > 0:
                    await asyncio.to_thread(self._republish, start - 1)
            if start > 0:
                self._outboxes_first_until = start + behind
            self.status.state = PeerState.TRAINING
            for round_index in range(start, self.rounds):
                reports.append(await self.run_round(round_index))
            await asyncio.to_thread(self.store.expire_job_keys, self.spec.redis.key_ttl_seconds)
        finally:
            await asyncio.to_thread(self._close_clients)
        self.status.state = PeerState.SUCCEEDED
        self.status.message = f"served {self.rounds} rounds"
        return reports

    def _republish(self, round_index: int) -> None:
        """Write the state adopted from the peers as this aggregator's checkpoint after ``round_index``.
        A peer still waiting for that round's model (it was behind the others when the aggregator and its
        Redis were lost) finds it and sends the next round's gradient; without it, that peer would wait for
        a later round, which waits for its gradient: a round deadline lost. The gradients that round used
        are not known here (``peersUsed`` 0)."""
        self._checkpoint(round_index, {"peersUsed": 0, "adoptedFromPeers": True})
        log.info("republished the model after round %d (adopted from the peers)", round_index + 1)

    def _checkpoint(self, round_index: int, meta: dict[str, object]) -> None:
        """The model and optimizer after ``round_index`` to this aggregator's Redis, where the peers read it."""
        state = self.replica.pack({"round": round_index})
        self.store.save_checkpoint(round_index, state, meta)
        self.ctx.cost.redis_bytes("checkpointWritten", len(state))

    def _close_clients(self) -> None:
        self.others.close()
        self.redis.close()

    async def run_round(self, round_index: int) -> RoundReport:
        self.inbox.current_round = round_index
        self.status.round = round_index
        metrics.ROUND.labels(**self.labels).set(round_index)
        phases: dict[str, float] = {}
        started = time.perf_counter()

        t0 = time.perf_counter()
        gradients = await self.collect(round_index)
        phases["exchange"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        combined = await asyncio.to_thread(self._combine, round_index, gradients)
        phases["aggregate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if combined is not None:
            await asyncio.to_thread(self.replica.apply, combined)
        phases["update"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        evaluation = None
        if closing.evaluation_due(self.ctx, round_index, self.rounds):
            evaluation = await asyncio.to_thread(self.replica.evaluate)
        phases["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        await closing.record_hash(self.ctx, self.replica, round_index)
        # Saved every round, also without an update: the peers wait for this round's checkpoint.
        await asyncio.to_thread(self._checkpoint, round_index, {"peersUsed": len(gradients)})
        await self.ctx.cost.tick_after_round(self.redis, last=round_index + 1 == self.rounds)
        phases["update"] += time.perf_counter() - t0

        report = RoundReport(
            round=round_index, loss=None, samples=0, phases=phases, peers_used=len(gradients),
            accuracy=evaluation[0] if evaluation else None, test_loss=evaluation[1] if evaluation else None,
        )
        record_round(self.status, self.labels, self.rounds, report, time.perf_counter() - started)
        return report

    async def collect(self, round_index: int) -> dict[int, np.ndarray]:
        """The round's gradients once it closes, or ``roundDeadlineSeconds`` after its first gradient
        arrived (after the round opened, when none did), with what the missing peers' outboxes hold
        then (they sent while this aggregator was down) or when it closed short of the quorum; in the
        rounds right after a restart, the outboxes are read first. Possibly none: every peer's fan-out failed,
        and the round has no update — the peers must not wait for a model that would never come."""
        spec = self.spec
        if round_index < self._outboxes_first_until:
            await self._from_outboxes(round_index)
        window = spec.exchange.round_deadline_seconds
        opened = time.monotonic()
        first: float | None = None
        while True:
            due = (first if first is not None else opened) + window
            wait = max(0.0, min(_WAIT_SLICE_SECONDS, due - time.monotonic()))
            if await self.inbox.wait_closed(round_index, spec.quorum, wait):
                break
            if first is None and self._arrived(round_index):
                first = time.monotonic()
            elif time.monotonic() >= due:
                break
        gradients = await self.inbox.collect(round_index, spec.quorum, time.monotonic())
        # Short of the quorum, by the deadline or because the peers missing have sent later rounds (this
        # one went to an aggregator that was lost, or they could not reach it): as a peer's ``collect``.
        if len(gradients) < spec.quorum:
            gradients |= await closing.from_outboxes(self.ctx, self.others, self.inbox.missing(gradients), round_index)
        closing.count_attendance(self.ctx, gradients)
        return gradients

    def _arrived(self, round_index: int) -> bool:
        return any(self.inbox.holds(round_index, p) for p in range(self.spec.peers))

    async def _from_outboxes(self, round_index: int) -> None:
        absent = [p for p in range(self.spec.peers) if not self.inbox.holds(round_index, p)]
        for peer, gradient in (await closing.from_outboxes(self.ctx, self.others, absent, round_index)).items():
            await self.inbox.file(round_index, peer, gradient)

    def _combine(self, round_index: int, gradients: dict[int, np.ndarray]) -> torch.Tensor | None:
        """The rule's combination (the replica's, with its centered-clipping state), or None (counted,
        logged) when this round has no update."""
        rule = self.spec.aggregation
        combined = closing.combine(self.ctx, self.replica, gradients)
        if combined is None or all_finite(combined):
            return combined
        diverged = Diverged("non-finite-aggregate", round_index,
                       f"the {rule.rule} of {len(gradients)} gradients has non-finite values")
        metrics.DIVERGENCES_TOTAL.labels(**self.labels, cause=diverged.cause).inc()
        if self.spec.training.on_divergence != "skipRound":
            self.status.failure = "divergence"
            raise diverged
        metrics.UPDATES_SKIPPED_TOTAL.labels(**self.labels, reason="divergence").inc()
        self.status.count_skipped_update("divergence")
        log.warning("%s; skipping this round's update (training.onDivergence=skipRound)", diverged)
        return None
