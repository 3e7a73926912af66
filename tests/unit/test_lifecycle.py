"""Job lifecycle: the transition table and the conditions derived from it."""

from __future__ import annotations

import pytest

from p2ptrain.status import PeerState
from p2ptrain_operator.lifecycle import Observed, Phase, Transition, conditions, next_phase


@pytest.mark.parametrize(
    "current,observed,expected",
    [
        (Phase.PENDING, Observed(peers=2), Phase.CREATED),
        (Phase.CREATED, Observed(peers=2, peer_states=[PeerState.STARTING, None]), Phase.CREATED),
        (Phase.CREATED, Observed(peers=2, peer_states=[PeerState.TRAINING, PeerState.STARTING]), Phase.RUNNING),
        (Phase.RUNNING, Observed(peers=2, peer_states=[PeerState.SUCCEEDED, PeerState.TRAINING]), Phase.RUNNING),
        (Phase.RUNNING, Observed(peers=2, peer_states=[PeerState.SUCCEEDED, PeerState.SUCCEEDED]), Phase.SUCCEEDED),
        (Phase.RUNNING, Observed(peers=2, peer_states=[PeerState.TRAINING, PeerState.FAILED]), Phase.FAILED),
        (Phase.RUNNING, Observed(peers=2, peer_states=[None, None]), Phase.RUNNING),
        (Phase.RUNNING, Observed(peers=2, peer_states=[PeerState.TRAINING] * 2, restarts=1), Phase.RESTARTING),
        (Phase.RESTARTING, Observed(peers=2, peer_states=[PeerState.TRAINING] * 2, restarts=1, previous_restarts=1), Phase.RUNNING),
        (Phase.RUNNING, Observed(peers=2, restarts=4, backoff_limit=3), Phase.FAILED),
        (Phase.RUNNING, Observed(peers=2, elapsed_seconds=61, active_deadline_seconds=60), Phase.FAILED),
        (Phase.RUNNING, Observed(peers=2, suspended=True), Phase.SUSPENDED),
        (Phase.SUSPENDED, Observed(peers=2, peer_states=[PeerState.TRAINING] * 2), Phase.RUNNING),
        (Phase.SUCCEEDED, Observed(peers=2, suspended=True, restarts=9), Phase.SUCCEEDED),
        (Phase.FAILED, Observed(peers=2, peer_states=[PeerState.TRAINING] * 2), Phase.FAILED),
    ],
)
def test_next_phase(current: Phase, observed: Observed, expected: Phase) -> None:
    assert next_phase(current, observed).phase == expected


def test_terminal_phases() -> None:
    assert {p for p in Phase if p.is_terminal} == {Phase.SUCCEEDED, Phase.FAILED}


def test_failure_reasons_name_the_cause() -> None:
    assert next_phase(Phase.RUNNING, Observed(peers=1, elapsed_seconds=10, active_deadline_seconds=5)).reason == "DeadlineExceeded"
    assert "backoffLimit=0" in next_phase(Phase.RUNNING, Observed(peers=1, restarts=1, backoff_limit=0)).message


def test_conditions_follow_the_phase_and_keep_transition_times() -> None:
    running = conditions(Transition(Phase.RUNNING, "Training", "peers are training"), [], "t1", generation=3)
    by_type = {c["type"]: c for c in running}
    assert by_type["Created"]["status"] == "True" and by_type["Running"]["status"] == "True"
    assert by_type["Succeeded"]["status"] == "False" and by_type["Running"]["observedGeneration"] == 3
    again = conditions(Transition(Phase.RUNNING, "Training", "peers are training"), running, "t2")
    assert {c["type"]: c["lastTransitionTime"] for c in again}["Running"] == "t1"
    done = {c["type"]: c for c in conditions(Transition(Phase.SUCCEEDED, "AllPeersSucceeded", "ok"), again, "t3")}
    assert done["Running"]["status"] == "False" and done["Running"]["lastTransitionTime"] == "t3"
    assert done["Succeeded"]["status"] == "True" and done["Created"]["lastTransitionTime"] == "t1"


def _pod(name: str, *containers: tuple[str, int, dict[str, object] | None]) -> dict[str, object]:
    return {"metadata": {"name": name}, "status": {"containerStatuses": [
        {"name": c, "restartCount": n, "lastState": {"terminated": t} if t else {}} for c, n, t in containers]}}


def test_the_restart_cause_is_the_latest_terminated_container_and_an_oom_kill_names_the_limit() -> None:
    from p2ptrain_operator.lifecycle import restart_cause

    assert restart_cause(_pod("j-peer-0", ("peer", 0, None))) is None
    early = {"reason": "Error", "exitCode": 1, "finishedAt": "2026-12-08T04:00:00Z"}
    late = {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-12-08T04:00:09Z"}
    when, why = restart_cause(_pod("j-peer-1", ("peer", 1, early), ("sidecar", 2, late))) or ("", "")
    assert when == late["finishedAt"]
    assert why.startswith("pod j-peer-1 container sidecar OOMKilled (exit 137): it exceeded its memory limit")
    assert "function.resources" in why
    _, plain = restart_cause(_pod("j-redis-0", ("redis", 1, early))) or ("", "")
    assert plain == "pod j-redis-0 container redis Error (exit 1)"


def test_a_failure_from_restarts_says_why_the_last_container_ended() -> None:
    observed = Observed(peers=2, restarts=1, backoff_limit=0, last_restart="pod j-peer-1 container peer OOMKilled (exit 137)")
    transition = next_phase(Phase.RUNNING, observed)
    assert transition.reason == "BackoffLimitExceeded"
    assert transition.message == "1 pod restarts exceed backoffLimit=0; last: pod j-peer-1 container peer OOMKilled (exit 137)"
    restarting = next_phase(Phase.RUNNING, Observed(peers=2, peer_states=[PeerState.TRAINING] * 2, restarts=1,
                                                     last_restart="pod j-peer-0 container peer Error (exit 1)"))
    assert restarting.message == "1 pod restarts so far; last: pod j-peer-0 container peer Error (exit 1)"
