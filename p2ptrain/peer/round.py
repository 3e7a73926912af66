"""One peer and its training round in the SPIRT architecture.

Each round the peer publishes its model version to its Redis, fans its minibatch out to the gradient
function, reads the in-database average, sends it to every other peer, waits for a quorum (or the
round deadline), aggregates what arrived with the configured robust rule and takes an optimizer step,
then checkpoints to Redis. ``Peer`` composes the parts (inbox, receiver, sender, function client,
recovery, replica, endpoint) and owns them: ``run`` closes what it opened on every way out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import httpx
import numpy as np
import redis
import torch

from p2ptrain import asgi, metrics, retry, wire
from p2ptrain.aggregate import all_finite
from p2ptrain.config import RuntimeConfig, Secrets
from p2ptrain.data import batch_indices, shard_indices
from p2ptrain.peer import closing
from p2ptrain.peer.attacker import PeerAttack
from p2ptrain.peer.context import PeerContext, due
from p2ptrain.peer.divergence import Diverged, DivergenceGuard
from p2ptrain.peer.endpoint import PeerEndpoint
from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.functions import FunctionClient
from p2ptrain.peer.inbox import Inbox
from p2ptrain.peer.inline import InlineGradients
from p2ptrain.peer.ps_round import AggregatorLink, AggregatorSender
from p2ptrain.peer.receiver import EventReceiver
from p2ptrain.peer.recovery import OtherPeers, resume
from p2ptrain.peer.replica import Replica
from p2ptrain.peer.report import RoundReport, record_round
from p2ptrain.peer.resync import Resync
from p2ptrain.peer.sender import GradientSender
from p2ptrain.peer.update import RoundUpdate
from p2ptrain.poster import Poster
from p2ptrain.spec import JobSpec
from p2ptrain.status import PeerState, PeerStatus
from p2ptrain.store import Keys, PeerStore, connect

log = logging.getLogger(__name__)

# How long a peer waits for its own Redis to come back (restarted pod, network blip) before failing.
REDIS_OUTAGE_SECONDS = 120.0
_REDIS_BACKOFF = retry.Backoff(first=0.1, cap=2.0)
_PEERS_BACKOFF = retry.Backoff(first=0.1, cap=0.1)


class Peer:
    def __init__(self, config: RuntimeConfig, index: int, secrets: Secrets) -> None:
        spec = config.spec
        if not 0 <= index < spec.peers:
            raise PeerError(f"peer index {index} is out of range for a job of {spec.peers} peers")
        self.config = config
        self.spec = spec
        self.index = index
        self.secrets = secrets
        self.labels = metrics.peer_labels(spec.name, spec.namespace, index)
        self.status = PeerStatus(peer=index)
        self.replica = Replica(spec)
        self.shard = shard_indices(len(self.replica.dataset.y_train), spec.peers, index, spec.dataset.split_seed)
        self.rounds = spec.total_rounds(len(self.shard))
        self.status.rounds = self.rounds
        self.redis = connect(config.redis[index], secrets.redis_password, socket_timeout=60)
        self.store = PeerStore(
            self.redis, Keys(spec.name, index),
            accumulator_mode=spec.redis.accumulator, key_ttl_seconds=spec.redis.key_ttl_seconds,
        )
        self.inbox = Inbox(spec.peers, index)
        self.ctx = PeerContext(config, index, secrets, self.status)
        self.update = RoundUpdate(spec, self.replica, self.store, self.ctx.cost)
        self.others = OtherPeers(self.ctx, self.replica.numel)
        self.receiver = EventReceiver(self.ctx, self.inbox, self.others)
        self.app = PeerEndpoint(spec, self.status, self.receiver, self.replica)
        self.guard = DivergenceGuard(spec.training)
        self.resync = Resync(self.ctx, self.store, self.others, self.replica)
        self.attack = PeerAttack.for_peer(self.ctx, self.inbox, self.replica)  # evaluation runs only
        self._functions: FunctionClient | InlineGradients | None = None
        self._sender: GradientSender | None = None
        self._ps = AggregatorLink(self.ctx) if spec.topology == "ps" else None  # topology ps: see ps_round
        self.parks_average = parks_average(spec, self.attack, self.replica)

    @property
    def numel(self) -> int:
        return self.replica.numel

    def final_state(self) -> dict[str, torch.Tensor]:
        return self.replica.final_state()

    async def resume(self) -> int:
        """Load this peer's own checkpoint, if its Redis has one; the round to continue at."""
        return await asyncio.to_thread(resume, self.store, self.replica, self.config.redis[self.index])

    async def catch_up(self, start: int) -> int:
        """Adopt the other peers' (ps: the aggregator's) state if they are ahead; the round to continue at."""
        return await asyncio.to_thread((self._ps or self.others).catch_up, self.replica, start)

    # --- the run -------------------------------------------------------------------------------------
    async def run(self) -> list[RoundReport]:
        """Train every round; resumes from the checkpoint in Redis if there is one."""
        reports: list[RoundReport] = []
        try:
            start = await self.resume()
            self.status.state = PeerState.TRAINING
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
            async with (httpx.AsyncClient(limits=limits, timeout=self.spec.function.timeout_seconds) as http,
                        Poster(max_connections=64, timeout_seconds=self.spec.function.timeout_seconds) as poster):
                # function.mode: the gradient function, or this peer's own torch (same round either way).
                self._functions = (InlineGradients(self.ctx, self.store, self.replica) if self.spec.function.inline
                                   else FunctionClient(self.ctx, self.store, poster))
                self._sender = (AggregatorSender if self._ps else GradientSender)(self.ctx, self.store, poster)
                try:
                    await closing.wait_for_peers(http, self.config, self.index)
                    start = await self.catch_up(start)
                    while start < self.rounds:
                        try:
                            reports.append(await self._run_round_through_redis_outages(start))
                            start = reports[-1].round + 1  # ps: a peer behind adopts a later round
                        except Diverged as exc:
                            self.status.failure = "divergence"
                            metrics.DIVERGENCES_TOTAL.labels(**self.labels, cause=exc.cause).inc()
                            raise
                    await self._sender.drain()  # the last rounds' gradients, bounded by the deadline
                finally:
                    await self._sender.close()
                    await self.update.close()  # the last checkpoint lands; the replica holds the final state
            await asyncio.to_thread(self.store.expire_job_keys, self.spec.redis.key_ttl_seconds)
        finally:
            await asyncio.to_thread(self._close_clients)
        self.status.state = PeerState.SUCCEEDED
        self.status.message = f"finished {self.rounds} rounds"
        return reports

    def _close_clients(self) -> None:
        self.others.close()
        self.redis.close()

    async def _run_round_through_redis_outages(self, round_index: int) -> RoundReport:
        """Run a round; if this peer's Redis goes away (pod restarted, network blip), wait for it and
        run the round again — every step is idempotent (versioned keys, per-part accumulation,
        duplicate gradients refused by the other peers)."""
        while True:
            try:
                return await self.run_round(round_index)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                address = self.config.redis[self.index]
                log.warning("lost this peer's Redis at %s in round %d: %s; waiting up to %.0fs for it",
                            address, round_index + 1, exc, REDIS_OUTAGE_SECONDS)
                self.status.message = f"waiting for Redis at {address}"
                deadline = time.monotonic() + REDIS_OUTAGE_SECONDS
                if not await asyncio.to_thread(retry.poll_blocking, self._redis_answers, deadline=deadline,
                                               backoff=_REDIS_BACKOFF):
                    raise PeerError(f"this peer's Redis at {address} did not come back within "
                                    f"{REDIS_OUTAGE_SECONDS:.0f}s: {exc}") from exc
                self.status.message = ""
                log.info("Redis at %s is back; running round %d again", address, round_index + 1)

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    # --- the round -----------------------------------------------------------------------------------
    async def run_round(self, round_index: int) -> RoundReport:
        spec = self.spec
        assert self._functions is not None and self._sender is not None, "run_round is called by run"
        self.inbox.current_round = round_index
        self.status.round = round_index
        self.status.epoch = round_index * spec.batch_size / max(1, len(self.shard))
        metrics.child(metrics.ROUND, **self.labels).set(round_index)
        phases: dict[str, float] = {}
        round_started = time.perf_counter()
        deadline = time.monotonic() + spec.exchange.round_deadline_seconds

        t0 = time.perf_counter()
        model_key = await self.update.publish(round_index, self._functions.publish)
        phases["publish"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        indices = batch_indices(self.shard, round_index, spec.batch_size, spec.seed + self.index)
        diverged = False
        try:
            receipts = await self._functions.fan_out(
                round_index, model_key, indices, deadline, skip_non_finite=self.guard.skips
            )
        except Diverged as exc:
            self._diverged(exc)
            receipts, diverged = [], True
        phases["fanout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        average = await self._functions.average(round_index, park=self.parks_average)
        phases["average"] = time.perf_counter() - t0
        samples = sum(r.samples for r in receipts)
        loss = sum(r.loss * r.samples for r in receipts) / samples if samples else None
        try:
            self.guard.check_loss(round_index, loss)
            if average is not None:
                self.guard.check_gradient(round_index, average[0], "this peer's")
        except Diverged as exc:
            self._diverged(exc)
            diverged = True

        t0 = time.perf_counter()
        own = None  # what this peer sends and applies: through the wire dtype, as the others receive it
        if average is not None and not diverged:
            # spec.evaluation.attack: an attacking peer sends (and applies) its attack instead, or nothing.
            # (At the round's parameters: with update: database the replica is read back first.)
            sent: np.ndarray | None = None
            if self.attack:
                await self.update.synced()
                sent = await self.attack.outgoing(round_index, average[0], indices, deadline)
            else:  # aggregation.momentum: honest peers send the momentum of their gradients (p2ptrain.momentum)
                sent = self.replica.published(round_index, average[0])
            own = as_sent(sent, spec.exchange.dtype) if sent is not None else None
        peers_used = 0
        if self._ps is not None:  # topology ps: send to the aggregator, adopt its model (peer/ps_round.py)
            await self.update.wait_for_pack()  # the adoption replaces the state the last round's copy (and hash) reads
            round_index, peers_used = await self._ps.exchange(round_index, own, self._sender, self.replica)
            self.update.replica_replaced()
        elif own is not None:
            await self.inbox.file(round_index, self.index, own)
            await self._sender.send(round_index, own, parked=self.parks_average)
        elif average is not None and self.parks_average:  # diverged: what Redis parked is not sent
            await asyncio.to_thread(self.store.client.delete, self.store.keys.outbox(round_index))
        gradients = await self.collect(round_index, deadline) if self._ps is None else {}
        phases["exchange"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        combined = None
        if self._ps is None:  # the rule's work on a small model (or the mean's one pass) costs less than the thread hop
            size = sum(g.nbytes for g in gradients.values())
            limit = asgi.STREAM_ON_LOOP_MAX_BYTES if spec.aggregation.rule == "mean" else asgi.ON_LOOP_MAX_BYTES
            combined = await asgi.off_loop_if_large(size, closing.combine, self.ctx, self.replica, gradients, limit=limit)
        if combined is not None and not all_finite(combined):
            self._diverged(Diverged("non-finite-aggregate", round_index,
                                    f"the {spec.aggregation.rule} of {len(gradients)} gradients has non-finite values"))
            combined = None
        phases["aggregate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if combined is not None:
            await self.update.apply(round_index, combined)
        if self.resync.due(round_index, self.rounds):  # replicas that drifted apart become identical again
            await self.update.synced()
            if (await asyncio.to_thread(self.resync.run, round_index)).adopted:
                self.update.replica_replaced()
        phases["update"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        evaluation = None
        if closing.evaluation_due(self.ctx, round_index, self.rounds):
            evaluation = await asyncio.to_thread((await self.update.synced()).evaluate)
        phases["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()  # the rest of the update: checkpoint and hash (of the evaluated parameters)
        hash_due = due(spec.training.hash_every_rounds, round_index, self.rounds)
        if due(spec.training.checkpoint_every_rounds, round_index, self.rounds):
            # Copied (and hashed) and written in the background, off the critical path.
            await self.update.checkpoint(round_index, loss, functools.partial(closing.note_hash, self.ctx, round_index)
                                         if hash_due else None)
        elif hash_due:  # no checkpoint this round (training.checkpointEveryRounds): a restart re-runs it
            if self.update.model_bytes > asgi.ON_LOOP_MAX_BYTES:  # a large model's hash leaves the critical path
                await self.update.hash_in_background(round_index, functools.partial(closing.note_hash, self.ctx, round_index))
            else:
                await closing.record_hash(self.ctx, await self.update.synced(), round_index)
        await self.ctx.cost.tick_after_round(self.redis, last=round_index + 1 == self.rounds)
        phases["update"] += time.perf_counter() - t0

        report = RoundReport(
            round=round_index, loss=loss, samples=samples, phases=phases, peers_used=len(gradients) if self._ps is None else peers_used,
            accumulated_samples=average[1] if average is not None else None,
            accuracy=evaluation[0] if evaluation else None, test_loss=evaluation[1] if evaluation else None,
        )
        record_round(self.status, self.labels, self.rounds, report, time.perf_counter() - round_started)
        return report

    async def collect(self, round_index: int, deadline: float) -> dict[int, np.ndarray]:
        """The round's gradients: what arrived by the quorum or deadline, plus what the missing peers
        left in their outboxes (they sent while we were down, or could not reach us)."""
        gradients = await self.inbox.collect(round_index, self.spec.quorum, deadline)
        if len(gradients) < self.spec.quorum:
            gradients |= await closing.from_outboxes(self.ctx, self.others, self.inbox.missing(gradients), round_index)
        closing.count_attendance(self.ctx, gradients)
        return gradients

    def _diverged(self, exc: Diverged) -> None:
        """``training.onDivergence``: fail (raise) or leave this round's diverging part out (counted)."""
        if not self.guard.skips:
            raise exc
        metrics.DIVERGENCES_TOTAL.labels(**self.labels, cause=exc.cause).inc()
        metrics.UPDATES_SKIPPED_TOTAL.labels(**self.labels, reason="divergence").inc()
        self.status.count_skipped_update("divergence")
        log.warning("%s; leaving it out of the round (training.onDivergence=skipRound)", exc,
                    extra={"reason": "divergence", "cause": exc.cause})


def parks_average(spec: JobSpec, attack: PeerAttack | None, replica: Replica) -> bool:
    """Whether this peer sends its average as the functions' Redis computed it (float32, uncompressed,
    to the other peers): Redis then parks it in the outbox as the peer reads it (P2P.MEANSTORE),
    instead of the peer sending the same bytes back."""
    return (spec.function.mode == "serverless" and spec.topology != "ps" and attack is None
            and replica.momentum is None and spec.exchange.dtype == "float32" and spec.exchange.compression == "none")


def as_sent(gradient: np.ndarray, dtype: str) -> np.ndarray:
    """``gradient`` as the other peers decode it (identity for float32; rounded for 16-bit dtypes)."""
    if dtype == "float32":
        return gradient
    return wire.decode_tensor(wire.encode_tensor(gradient, dtype), expected_numel=gradient.size)
