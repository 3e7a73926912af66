"""A job's lifecycle: phases with terminal flags, one pure transition function, derived conditions.

``next_phase`` decides what a job is from what was observed (peers' reported states, pod restarts,
deadlines, suspension) and never from handler-local state, so a restarted operator reaches the same
answer. Conditions are derived from the phase, never set ad hoc.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2ptrain.status import PeerState


class Phase(enum.StrEnum):
    PENDING = "Pending"
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


CONDITION_TYPES = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class Observed:
    """What the operator saw of a job's children and peers."""

    peers: int
    peer_states: Sequence[PeerState | None] = ()  # from each peer's /status; None when it did not answer
    restarts: int = 0  # container restarts summed over the job's pods
    previous_restarts: int = 0
    suspended: bool = False
    backoff_limit: int = 3
    elapsed_seconds: float | None = None
    active_deadline_seconds: int | None = None
    failure_message: str = ""
    last_restart: str = ""  # why the latest restarted container ended (``restart_cause``), "" if none did


@dataclass(frozen=True)
class Transition:
    phase: Phase
    reason: str
    message: str


def restart_cause(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(when, why) the latest restarted container of ``pod`` ended, from its ``lastState``: the
    container, the reason the kubelet gave (``OOMKilled``, ``Error``) and the exit code; an
    out-of-memory kill also says which limit to raise. None when no container restarted."""
    ended = []
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("lastState") or {}).get("terminated")
        if terminated and int(container.get("restartCount", 0)) > 0:
            ended.append((str(terminated.get("finishedAt") or ""), container.get("name", "?"), terminated))
    if not ended:
        return None
    when, container, terminated = max(ended, key=lambda e: e[0])
    reason = terminated.get("reason") or "Terminated"
    why = f"pod {pod.get('metadata', {}).get('name', '?')} container {container} {reason} (exit {terminated.get('exitCode')})"
    if reason == "OOMKilled":
        why += (": it exceeded its memory limit (inline peers get function.resources times the instances"
                " one round keeps busy; a namespace's LimitRange may set others)")
    return when, why


def next_phase(current: Phase, observed: Observed) -> Transition:
    """The phase a job is in now, given the phase it was in and what was observed."""
    if current.is_terminal:
        return Transition(current, "Finished", f"job already {current.value.lower()}")
    if observed.suspended:
        return Transition(Phase.SUSPENDED, "Suspended", "runPolicy.suspend is true: peers and Redis scaled to zero")
    deadline = observed.active_deadline_seconds
    if deadline is not None and observed.elapsed_seconds is not None and observed.elapsed_seconds > deadline:
        return Transition(Phase.FAILED, "DeadlineExceeded", f"job ran longer than activeDeadlineSeconds={deadline}")
    cause = f"; last: {observed.last_restart}" if observed.last_restart else ""
    if observed.restarts > observed.backoff_limit:
        return Transition(
            Phase.FAILED,
            "BackoffLimitExceeded",
            f"{observed.restarts} pod restarts exceed backoffLimit={observed.backoff_limit}{cause}",
        )
    states = list(observed.peer_states)
    if PeerState.FAILED in states:
        peer = states.index(PeerState.FAILED)
        return Transition(Phase.FAILED, "PeerFailed", observed.failure_message or f"peer {peer} failed")
    if len(states) == observed.peers and states and all(s == PeerState.SUCCEEDED for s in states):
        return Transition(Phase.SUCCEEDED, "AllPeersSucceeded", f"all {observed.peers} peers finished training")
    if observed.restarts > observed.previous_restarts:
        return Transition(Phase.RESTARTING, "PodRestarted", f"{observed.restarts} pod restarts so far{cause}")
    if any(s in (PeerState.TRAINING, PeerState.SUCCEEDED) for s in states):
        return Transition(Phase.RUNNING, "Training", "peers are training")
    if current in (Phase.RUNNING, Phase.RESTARTING):
        return Transition(current, "Waiting", "waiting for peers to report")
    return Transition(Phase.CREATED, "ChildrenCreated", "children created, waiting for peers to start")


def conditions(
    transition: Transition,
    previous: Sequence[Mapping[str, Any]],
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Kubernetes-style conditions derived from the phase; lastTransitionTime moves only on change."""
    earlier = {c.get("type"): c for c in previous}
    phase = transition.phase
    result = []
    for kind in CONDITION_TYPES:
        if kind == "Created":
            active = phase != Phase.PENDING
        else:
            active = phase.value == kind
        status = "True" if active else "False"
        before = earlier.get(kind)
        changed = before is None or before.get("status") != status
        # While Pending, Created=False carries the reason the children are not there yet.
        told = active or (kind == "Created" and phase == Phase.PENDING)
        condition: dict[str, Any] = {
            "type": kind,
            "status": status,
            "reason": transition.reason if told else (before or {}).get("reason", kind + "NotActive"),
            "message": transition.message if told else "",
            "lastTransitionTime": now if changed else before.get("lastTransitionTime", now),  # type: ignore[union-attr]
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    return result
