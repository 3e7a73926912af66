"""Re-synchronising replicas that drifted apart (``training.resyncEveryRounds``).

With ``exchange.quorum`` below ``peers`` each peer aggregates whatever arrived first, so peers may
apply different updates and their replicas drift; with the full quorum too, when a round closes at
its deadline without a restarting or late peer, which then closes it with its own gradient. Every
``resyncEveryRounds`` rounds, and after the last round, each peer publishes its parameter hash and
packed state (model and optimizer) for that round in its own Redis, then reads the other peers' hashes
from theirs. When the hashes differ, every peer adopts the coordinate-wise median of the same peers'
states of that round: the same bytes in, the same deterministic median out, so every replica is
bitwise identical again (and, with 2f+1 states, f Byzantine ones cannot pull the result outside the
honest range).

Which peers take part is agreed through Redis as well: the first peers to decide write the list they
used (``members``) beside their state, and a peer that arrives later takes that list instead of its
own view, so a slow peer converges on the same state as the fast ones. A peer that has not published
by the sync deadline (the round deadline) is left out.

All of it is blocking Redis I/O and tensor work: the round runs ``Resync.run`` in a worker thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import cast

import redis

from p2ptrain import metrics, retry
from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS
from p2ptrain.checkpoint import CheckpointError, median_state, model_tensors
from p2ptrain.peer.context import PeerContext, PeerPart, due
from p2ptrain.peer.recovery import OtherPeers
from p2ptrain.peer.replica import Replica
from p2ptrain.spec import JobSpec
from p2ptrain.store import Keys, PeerStore

log = logging.getLogger(__name__)

# Sync rounds whose states each peer keeps, so a peer one sync behind still finds the others' states.
SYNC_ROUNDS_KEPT = 2
_BACKOFF = retry.Backoff(first=0.02, cap=0.25)


def sync_due(spec: JobSpec, rounds: int, round_index: int) -> bool:
    """Whether the replicas are compared after ``round_index`` (0-based) in a job of ``rounds`` rounds.

    Whenever drift is possible, so not with topology ps (every peer adopts the aggregator's model).
    The full quorum does not rule it out: a round closes at its deadline without a peer that was
    restarting or late, and that peer, when it closes the round, adds its own gradient (seen on a real
    node: a deleted peer pod that resumed from its checkpoint stayed apart from the others to the end).
    """
    every = spec.training.resync_every_rounds
    if every == 0 or spec.topology == "ps":
        return False
    return due(every, round_index, rounds)


@dataclass(frozen=True)
class SyncOutcome:
    round: int  # 1-based: the state after this round was compared
    peers: tuple[int, ...]  # whose states were compared (and merged, when they differed)
    distinct_hashes: int
    hash_before: str
    hash_after: str
    adopted: bool  # this peer's parameters changed

    def as_status(self) -> dict[str, object]:
        return {"round": self.round, "peers": list(self.peers), "distinctHashes": self.distinct_hashes,
                "hashBefore": self.hash_before, "hashAfter": self.hash_after, "adopted": self.adopted}


class Resync(PeerPart):
    def __init__(self, ctx: PeerContext, store: PeerStore, others: OtherPeers, replica: Replica) -> None:
        super().__init__(ctx)
        self.store = store
        self.others = others
        self.replica = replica

    def due(self, round_index: int, rounds: int) -> bool:
        return sync_due(self.spec, rounds, round_index)

    def run(self, round_index: int) -> SyncOutcome:
        """Publish this peer's state for the round, agree on the peers to compare (waiting for them up
        to the round deadline), and adopt their median if their hashes differ. Returns what happened
        (also in the status and metrics)."""
        deadline = time.monotonic() + self.spec.exchange.round_deadline_seconds
        before = self.replica.params_hash()
        self._publish(round_index, before)
        members = self._agree_on_members(round_index, before, deadline)
        hashes = {peer: self._field(peer, round_index, "hash") for peer in members}
        present = tuple(p for p in members if hashes[p] is not None)
        distinct = {cast(bytes, hashes[p]).decode() for p in present}
        adopted = False
        if distinct and distinct != {before}:
            adopted = self._adopt(round_index, present, len(distinct))
        after = self.replica.params_hash() if adopted else before
        outcome = SyncOutcome(round_index + 1, present, len(distinct), before, after, adopted)
        self.status.last_sync = outcome.as_status()
        if adopted:
            self.status.resyncs += 1
            metrics.RESYNCS_TOTAL.labels(**self.labels).inc()
        log.info("sync after round %d: %d distinct hashes among peers %s%s", round_index + 1, len(distinct),
                 list(present), "; adopted their median" if adopted else "", extra=outcome.as_status())
        return outcome

    # --- steps ----------------------------------------------------------------------------------------
    def _publish(self, round_index: int, digest: str) -> None:
        keys = self.store.keys
        state = self.replica.pack({"round": round_index})
        pipe = self.store.client.pipeline(transaction=True)
        pipe.hset(keys.sync(round_index), mapping={"hash": digest, "state": state})
        pipe.expire(keys.sync(round_index), ROUND_KEY_TTL_SECONDS)
        stale = round_index - SYNC_ROUNDS_KEPT * max(1, self.spec.training.resync_every_rounds)
        if stale >= 0:
            pipe.delete(keys.sync(stale))
        pipe.execute()

    def _agree_on_members(self, round_index: int, own_hash: str, deadline: float) -> tuple[int, ...]:
        """The peers whose states this sync compares: the list a peer that decided earlier wrote, or
        else every peer that published by the deadline. Written back for the peers that come later."""
        published = {self.index}

        def decided() -> bool:
            if self._members_chosen_by_others(round_index) is not None:
                return True
            for peer in range(self.spec.peers):
                if peer not in published and self._field(peer, round_index, "hash") is not None:
                    published.add(peer)
            return len(published) == self.spec.peers

        retry.poll_blocking(decided, deadline=deadline, backoff=_BACKOFF)
        members = self._members_chosen_by_others(round_index) or tuple(sorted(published))
        if len(members) < self.spec.peers:
            missing = sorted(set(range(self.spec.peers)) - set(members))
            log.warning("sync after round %d without peers %s: they did not publish in time",
                        round_index + 1, missing)
        self.store.client.hset(self.store.keys.sync(round_index), "members", json.dumps(list(members)))
        return members

    def _members_chosen_by_others(self, round_index: int) -> tuple[int, ...] | None:
        """The most common list among the other peers' choices (ties: the lowest peer's), if any."""
        chosen: list[tuple[int, ...]] = []
        for peer in range(self.spec.peers):
            if peer == self.index:
                continue
            raw = self._field(peer, round_index, "members")
            if raw is None:
                continue
            try:
                members = json.loads(raw)
            except ValueError:
                continue
            valid = isinstance(members, list) and all(isinstance(m, int) and 0 <= m < self.spec.peers for m in members)
            if valid and members:
                chosen.append(tuple(sorted(set(members))))
        if not chosen:
            return None
        return Counter(chosen).most_common(1)[0][0]

    def _adopt(self, round_index: int, members: tuple[int, ...], distinct: int) -> bool:
        states: list[bytes] = []
        for peer in members:
            state = self._field(peer, round_index, "state")
            if state is None:
                log.warning("sync after round %d: peer %d's state is gone; comparing without it", round_index + 1, peer)
                continue
            if not self._fits(state):  # the same bytes fail on every peer: all leave it out alike
                log.warning("sync after round %d: peer %d's state does not fit this model; comparing without it",
                            round_index + 1, peer)
                continue
            states.append(state)
        if not states:
            return False
        try:
            merged = states[0] if distinct == 1 else median_state(states)
            self.replica.load(merged)
        except CheckpointError as exc:
            log.warning("sync after round %d: cannot adopt the peers' median state, keeping this replica: %s",
                        round_index + 1, exc)
            return False
        return True

    def _fits(self, state: bytes) -> bool:
        try:
            tensors = model_tensors(state)
        except CheckpointError:
            return False
        own = self.replica.model.state_dict()
        return tensors.keys() == own.keys() and all(
            tensors[k].shape == own[k].shape and tensors[k].dtype == own[k].dtype for k in own
        )

    def _field(self, peer: int, round_index: int, name: str) -> bytes | None:
        """One field of a peer's sync entry (this peer's own Redis or another's); None if absent or unreachable."""
        client = self.store.client if peer == self.index else self.others.client(peer)
        try:
            value = client.hget(Keys(self.spec.name, peer).sync(round_index), name)
        except redis.RedisError as exc:
            if peer == self.index:
                raise  # this peer's own Redis: the round waits for it and runs again
            log.info("cannot read peer %d's sync entry for round %d: %s", peer, round_index + 1, exc)
            return None
        return None if value is None else bytes(cast(bytes, value))
