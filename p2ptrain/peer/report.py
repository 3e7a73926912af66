"""What a finished round leaves behind: its ``RoundReport``, the round metrics, the status fields the
local runner and the operator read, and one structured log line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p2ptrain import metrics
from p2ptrain.status import PeerStatus

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    round: int
    loss: float | None
    samples: int
    phases: dict[str, float]
    peers_used: int
    accuracy: float | None = None
    test_loss: float | None = None
    # the samples summed in this peer's Redis accumulator (equals ``samples`` unless a micro-batch's reply
    # was lost after it was added, or one was added twice): what chaos runs check
    accumulated_samples: float | None = None


def record_round(
    status: PeerStatus, labels: dict[str, str], rounds: int, report: RoundReport, total_seconds: float
) -> None:
    for phase, seconds in report.phases.items():
        metrics.child(metrics.ROUND_PHASE_SECONDS, **labels, phase=phase).observe(seconds)
    metrics.child(metrics.ROUND_SECONDS, **labels).observe(total_seconds)
    metrics.child(metrics.ROUNDS_TOTAL, **labels).inc()
    # The first round of a run pays the functions' cold starts: reported apart from the steady state.
    if not status.phases_first:
        status.phases_first = dict(report.phases)
    else:
        for phase, seconds in report.phases.items():
            status.phases_total[phase] = status.phases_total.get(phase, 0.0) + seconds
        status.rounds_timed += 1
    status.phases_last = dict(report.phases)
    status.round = report.round + 1
    status.training_seconds += total_seconds
    if report.loss is not None:
        metrics.child(metrics.LOSS, **labels).set(report.loss)
        status.loss = report.loss
    if report.accuracy is not None and report.test_loss is not None:
        status.accuracy, status.test_loss = report.accuracy, report.test_loss
        status.record_accuracy(report.accuracy)
        metrics.ACCURACY.labels(**labels).set(report.accuracy)
        metrics.TEST_LOSS.labels(**labels).set(report.test_loss)
    log.info(
        "round done",
        extra={
            "round": report.round + 1,  # 1-based like status.round and the progress display
            "of": rounds,
            "loss": report.loss,
            "accuracy": report.accuracy,
            "peers_used": report.peers_used,
            "samples": report.samples,
            "accumulated_samples": report.accumulated_samples,
            "seconds": round(total_seconds, 4),
            **{phase: round(seconds, 4) for phase, seconds in report.phases.items()},
        },
    )
