"""A peer's reported status: the ``PeerState`` enum and the ``/status`` schema, shared by writer and readers.

The peer writes it (``PeerStatus.as_dict``); the local runner and the operator read it from
``GET /status``. The JSON keys and the state strings are the contract: change them here only.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any, TypedDict

# Test accuracies whose first crossing a peer reports (round and training seconds): time to accuracy.
ACCURACY_MILESTONES = (0.5, 0.8, 0.9, 0.95, 0.99)
# Parameter hashes a peer keeps in its status (see ``PeerStatus.record_params_hash``).
PARAMS_HASHES_KEPT = 64


class PeerState(enum.StrEnum):
    """Where a peer is; the values are what ``/status`` reports and the operator's lifecycle reads."""

    STARTING = "starting"
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (PeerState.SUCCEEDED, PeerState.FAILED)


class Milestone(TypedDict):
    round: int
    seconds: float


class StatusDict(TypedDict):
    """The JSON body of a peer's ``GET /status``."""

    peer: int
    state: str  # a PeerState value
    round: int  # rounds finished (1-based once a round is done)
    rounds: int
    epoch: float
    loss: float | None
    accuracy: float | None
    testLoss: float | None
    message: str
    phases: dict[str, float]
    phasesMean: dict[str, float]
    phasesFirst: dict[str, float]
    functionColdStarts: int
    functionRetries: int
    functionFailures: dict[str, int]
    rejected: dict[str, int]
    excluded: dict[str, int]
    sendFailures: int
    skippedUpdates: dict[str, int]
    trainingSeconds: float
    reached: dict[str, Milestone]
    caughtUp: dict[str, int]
    recovered: int
    failure: str  # "" or "divergence": why a failed peer failed, for the runner's exit code
    paramsHashes: dict[str, str]  # round (1-based, as a string) -> hash of the parameters after it
    resyncs: int  # sync rounds at which this peer adopted the median of the peers' states
    lastSync: dict[str, Any]  # round, peers compared, distinct hashes before, hash after, adopted or not
    attack: str  # "" or the attack kind this peer injects (spec.evaluation.attack: evaluation runs only)
    cost: dict[str, Any]  # what this peer used so far (``p2ptrain.cost.empty_cost`` is its shape)


class StatusError(ValueError):
    """A ``/status`` body that does not follow the schema."""


def parse_status(payload: Any) -> StatusDict:
    """Check the fields readers rely on (``peer``, ``state``, ``round``) and return the typed status."""
    if not isinstance(payload, dict):
        raise StatusError(f"peer status must be a JSON object, got {type(payload).__name__}")
    if not isinstance(payload.get("peer"), int) or not isinstance(payload.get("round"), int):
        raise StatusError("peer status needs integer 'peer' and 'round' fields")
    try:
        PeerState(str(payload.get("state")))
    except ValueError as exc:
        raise StatusError(f"peer status 'state' must be one of {[s.value for s in PeerState]}, "
                          f"got {payload.get('state')!r}") from exc
    return payload  # type: ignore[return-value]


def record_milestones(reached: dict[str, Milestone], accuracy: float, round_number: int, seconds: float) -> None:
    """Remember when each accuracy milestone was first reached (time to accuracy)."""
    for milestone in ACCURACY_MILESTONES:
        if accuracy >= milestone and f"{milestone:g}" not in reached:
            reached[f"{milestone:g}"] = {"round": round_number, "seconds": round(seconds, 3)}


def _count(counts: dict[str, int], reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


@dataclass
class PeerStatus:
    peer: int
    state: PeerState = PeerState.STARTING
    round: int = 0
    rounds: int = 0
    epoch: float = 0.0
    loss: float | None = None
    accuracy: float | None = None
    test_loss: float | None = None
    message: str = ""
    phases_last: dict[str, float] = field(default_factory=dict)
    phases_first: dict[str, float] = field(default_factory=dict)
    phases_total: dict[str, float] = field(default_factory=dict)
    rounds_timed: int = 0
    function_cold_starts: int = 0
    function_retries: int = 0
    function_failures: dict[str, int] = field(default_factory=dict)  # failed micro-batch attempts by reason
    rejected: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    send_failures: int = 0  # gradients a peer never took before the deadline
    skipped_updates: dict[str, int] = field(default_factory=dict)  # rounds without an optimizer step, by reason
    training_seconds: float = 0.0  # sum of this run's round times
    caught_up: dict[str, int] = field(default_factory=dict)  # rounds skipped by adopting peers' state
    recovered: int = 0  # gradients taken from other peers' outboxes after their events were missed
    reached: dict[str, Milestone] = field(default_factory=dict)  # "0.9" -> first round, seconds
    failure: str = ""
    params_hashes: dict[str, str] = field(default_factory=dict)  # the last PARAMS_HASHES_KEPT rounds hashed
    resyncs: int = 0
    last_sync: dict[str, Any] = field(default_factory=dict)
    attack: str = ""  # the attack kind while this peer is an evaluation's Byzantine attacker
    cost: dict[str, Any] = field(default_factory=dict)  # kept up to date by the peer's p2ptrain.ledger.PeerCost

    def record_params_hash(self, round_number: int, digest: str) -> None:
        # Several rounds are kept: a reader polling slower than rounds finish still sees common rounds.
        self.params_hashes[str(round_number)] = digest
        while len(self.params_hashes) > PARAMS_HASHES_KEPT:
            del self.params_hashes[next(iter(self.params_hashes))]

    def record_accuracy(self, accuracy: float) -> None:
        record_milestones(self.reached, accuracy, self.round, self.training_seconds)

    def count_rejected(self, reason: str) -> None:
        _count(self.rejected, reason)

    def count_excluded(self, reason: str, n: int) -> None:
        _count(self.excluded, reason, n)

    def count_function_failure(self, reason: str) -> None:
        _count(self.function_failures, reason)

    def count_skipped_update(self, reason: str) -> None:
        _count(self.skipped_updates, reason)

    def as_dict(self) -> StatusDict:
        mean = {k: v / self.rounds_timed for k, v in self.phases_total.items()} if self.rounds_timed else {}
        return {
            "peer": self.peer,
            "state": self.state.value,
            "round": self.round,
            "rounds": self.rounds,
            "epoch": self.epoch,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "testLoss": self.test_loss,
            "message": self.message,
            "phases": self.phases_last,
            "phasesMean": mean,
            "phasesFirst": self.phases_first,
            "functionColdStarts": self.function_cold_starts,
            "functionRetries": self.function_retries,
            "functionFailures": self.function_failures,
            "rejected": self.rejected,
            "excluded": self.excluded,
            "sendFailures": self.send_failures,
            "skippedUpdates": self.skipped_updates,
            "trainingSeconds": self.training_seconds,
            "reached": self.reached,
            "caughtUp": self.caught_up,
            "recovered": self.recovered,
            "failure": self.failure,
            "paramsHashes": dict(self.params_hashes),
            "resyncs": self.resyncs,
            "lastSync": dict(self.last_sync),
            "attack": self.attack,
            "cost": copy.deepcopy(self.cost),
        }


class ReplicaCheck:
    """The cross-peer check that replicas stay bitwise identical: the peers' parameter hashes for the
    same round must be equal. A reader (the local runner, the operator) notes every status it reads."""

    def __init__(self, peers: int) -> None:
        self.peers = peers
        self.hashes: dict[int, dict[int, str]] = {}  # round -> peer -> hash

    def note(self, status: StatusDict) -> None:
        for round_number, digest in status.get("paramsHashes", {}).items():
            self.hashes.setdefault(int(round_number), {})[status["peer"]] = digest

    def drift_rounds(self) -> list[int]:
        """Rounds after which every peer reported a hash and they were not all equal."""
        return sorted(r for r, h in self.hashes.items() if len(h) == self.peers and len(set(h.values())) > 1)

    def result(self) -> dict[str, Any]:
        compared = sum(1 for h in self.hashes.values() if len(h) == self.peers)
        drift = self.drift_rounds()
        return {"rounds_compared": compared, "identical": not drift, "drift_rounds": drift}
