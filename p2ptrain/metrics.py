"""Every Prometheus metric p2ptrain exports, declared once.

Peers and gradient functions import these objects; nothing else creates metrics (the operator's own
metrics live in ``p2ptrain_operator.metrics``, so peers and functions never export them). Names
follow Prometheus conventions (base units, ``_total``, ``_seconds``, ``_bytes``) and labels are bounded:
``job``, ``namespace``, ``peer`` plus small enums (``phase``, ``reason``, ``outcome``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

PEER_LABELS = ("job", "namespace", "peer")
FUNCTION_LABELS = ("job", "namespace")

# ``evaluate``: the held-out evaluation (every ``evaluation.everyRounds``; 0 in the rounds between), timed
# apart from ``update`` (the optimizer step, checkpoint and hash) so that neither hides the other.
ROUND_PHASES = ("publish", "fanout", "average", "exchange", "aggregate", "update", "evaluate")
REJECT_REASONS = (
    "malformed",
    "signature",
    "shape",
    "nonfinite",
    "version",
    "oversize",
    "stale",
    "duplicate",
    "unknown-peer",
    "dataref",
    "content-type",
)
EXCLUDE_REASONS = ("deadline", "rejected", "rule")
# Why a round ended without an optimizer step: too few gradients for the rule, or the rule refused them.
SKIP_REASONS = ("too-few-gradients", "rule-failed", "divergence")
# Why a gradient function call attempt failed: no answer, an error status, or a 200 whose reply is bad.
FUNCTION_FAILURE_REASONS = ("http", "status", "reply")
# Why a gradient never reached a peer: it stayed unreachable until the deadline, or refused the event.
SEND_FAILURE_REASONS = ("unreachable", "refused")

# Rounds of a few milliseconds (tiny models, one machine) up to minutes (big models, cold starts).
_ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# --- peer ------------------------------------------------------------------------------------------
ROUND_PHASE_SECONDS = Histogram(
    "p2ptrain_round_phase_seconds",
    "Wall time of one phase of a training round.",
    (*PEER_LABELS, "phase"),
    buckets=_ROUND_BUCKETS,
)
ROUND_SECONDS = Histogram(
    "p2ptrain_round_seconds", "Wall time of a whole training round.", PEER_LABELS, buckets=_ROUND_BUCKETS
)
ROUNDS_TOTAL = Counter("p2ptrain_rounds_total", "Training rounds completed.", PEER_LABELS)
ROUND = Gauge("p2ptrain_round", "The round the peer is in.", PEER_LABELS)
LOSS = Gauge("p2ptrain_loss", "Training loss of the peer's last round (mean over its micro-batches).", PEER_LABELS)
# The parameter hash as a number (its first 48 bits: exact in a float64) and the round it was taken
# after: replicas are identical when, for one round, every peer shows the same value, e.g.
# count(count_values("h", p2ptrain_params_hash) by (job)) > 1 while p2ptrain_params_hash_round agrees.
PARAMS_HASH = Gauge("p2ptrain_params_hash", "First 48 bits of the XXH3-128 hash of the peer's parameters.", PEER_LABELS)
PARAMS_HASH_ROUND = Gauge("p2ptrain_params_hash_round", "The round after which p2ptrain_params_hash was taken.",
                          PEER_LABELS)
TEST_LOSS = Gauge("p2ptrain_test_loss", "Loss on the held-out split at the last evaluation.", PEER_LABELS)
ACCURACY = Gauge("p2ptrain_accuracy", "Accuracy on the held-out split at the last evaluation.", PEER_LABELS)
# FOR EVALUATION ONLY (spec.evaluation.attack): 1 on a peer that attacks, so no one mistakes the run for a
# real one; ``kind`` is one of p2ptrain.attack.KINDS (a small enum).
PEER_ATTACKING = Gauge(
    "p2ptrain_peer_attacking", "1 while this peer is a Byzantine attacker of an evaluation run, by attack kind.",
    (*PEER_LABELS, "kind"),
)
PEERS_ACTIVE = Gauge(
    "p2ptrain_peers_active", "Peers whose gradient arrived in time in the last round (own included).", PEER_LABELS
)
PEERS_EXCLUDED_TOTAL = Counter(
    "p2ptrain_peers_excluded_total",
    "Peer gradients left out of aggregation, by reason.",
    (*PEER_LABELS, "reason"),
)
EXCHANGE_SENT_BYTES_TOTAL = Counter(
    "p2ptrain_exchange_sent_bytes_total", "Gradient bytes sent to other peers.", PEER_LABELS
)
EXCHANGE_RECEIVED_BYTES_TOTAL = Counter(
    "p2ptrain_exchange_received_bytes_total", "Gradient bytes received from other peers.", PEER_LABELS
)
EVENTS_REJECTED_TOTAL = Counter(
    "p2ptrain_events_rejected_total", "Incoming events refused, by reason.", (*PEER_LABELS, "reason")
)
FUNCTION_RETRIES_TOTAL = Counter(
    "p2ptrain_function_retries_total", "Gradient function calls retried by the peer.", PEER_LABELS
)
FUNCTION_CALL_FAILURES_TOTAL = Counter(
    "p2ptrain_function_call_failures_total",
    "Gradient function call attempts that failed (each is retried until the deadline), by reason.",
    (*PEER_LABELS, "reason"),
)
EXCHANGE_SEND_FAILURES_TOTAL = Counter(
    "p2ptrain_exchange_send_failures_total",
    "Gradients this peer sent that another peer never took, by reason.",
    (*PEER_LABELS, "reason"),
)
OUTBOX_GRADIENTS_INVALID_TOTAL = Counter(
    "p2ptrain_outbox_gradients_invalid_total",
    "Gradients read from another peer's outbox that failed validation, by reject reason.",
    (*PEER_LABELS, "reason"),
)
DIVERGENCES_TOTAL = Counter(
    "p2ptrain_divergences_total",
    "Rounds in which training diverged (non-finite loss or gradient, exploding loss), by cause.",
    (*PEER_LABELS, "cause"),
)
UPDATES_SKIPPED_TOTAL = Counter(
    "p2ptrain_updates_skipped_total",
    "Rounds that ended without an optimizer step, by reason.",
    (*PEER_LABELS, "reason"),
)
GRADIENTS_RECOVERED_TOTAL = Counter(
    "p2ptrain_gradients_recovered_total",
    "Peer gradients taken from the sender's outbox in Redis after their event was missed.",
    PEER_LABELS,
)
PEER_EXCLUDED_ROUNDS = Gauge(
    "p2ptrain_peer_excluded_rounds",
    "Rounds in a row this peer has aggregated without excluded_peer's gradient (0 once it arrives again).",
    (*PEER_LABELS, "excluded_peer"),
)
CATCH_UPS_TOTAL = Counter(
    "p2ptrain_catch_ups_total",
    "Times a (re)started peer adopted the other peers' state because it was behind.",
    PEER_LABELS,
)
RESYNCS_TOTAL = Counter(
    "p2ptrain_resyncs_total",
    "Sync rounds at which the peers' parameter hashes differed and this peer adopted the median of their states.",
    PEER_LABELS,
)

# --- gradient function -----------------------------------------------------------------------------
FUNCTION_INVOCATIONS_TOTAL = Counter(
    "p2ptrain_function_invocations_total",
    "Gradient function invocations, by outcome.",
    (*FUNCTION_LABELS, "outcome"),
)
FUNCTION_DURATION_SECONDS = Histogram(
    "p2ptrain_function_duration_seconds",
    "Time the gradient function spends on one event.",
    FUNCTION_LABELS,
    buckets=_ROUND_BUCKETS,
)
FUNCTION_COLD_STARTS_TOTAL = Counter(
    "p2ptrain_function_cold_starts_total",
    "Gradient function instances started (first invocation after scale from zero or scale out).",
    FUNCTION_LABELS,
)
# One series per running instance, wherever it runs (a Knative pod scraped by the PodMonitor, or a
# local runner's process): ``count`` over it is the number of instances, and ``time() - it`` their age.
FUNCTION_INSTANCE_START_TIME_SECONDS = Gauge(
    "p2ptrain_function_instance_start_time_seconds",
    "Unix time this gradient function instance loaded its job (one series per running instance).",
    FUNCTION_LABELS,
)
FUNCTION_MODEL_LOADS_TOTAL = Counter(
    "p2ptrain_function_model_loads_total", "Model versions loaded from Redis (cache misses).", FUNCTION_LABELS
)

# --- cost (per peer: what the job uses, priced by ``p2ptrain.cost``) ------------------------------------
# Paths bytes take between peers, and to and from a peer's Redis (``p2ptrain.cost`` names them).
PEER_BYTE_PATHS = ("exchange-sent", "exchange-received", "dataref-fetched", "outbox-fetched")
REDIS_BYTE_PATHS = ("model-published", "model-read", "accumulator-written", "mean-read", "outbox-written",
                    "checkpoint-written", "checkpoint-read")
COST_FUNCTION_INVOCATIONS_TOTAL = Counter(
    "p2ptrain_cost_function_invocations_total",
    "Gradient function invocations this peer made (every attempt: platforms bill failed ones too).",
    PEER_LABELS,
)
COST_FUNCTION_CPU_SECONDS_TOTAL = Counter(
    "p2ptrain_cost_function_cpu_seconds_total", "CPU seconds the gradient function reported for this peer's calls.",
    PEER_LABELS,
)
COST_FUNCTION_WALL_SECONDS_TOTAL = Counter(
    "p2ptrain_cost_function_wall_seconds_total",
    "Wall seconds the gradient function reported handling this peer's calls (billed duration).",
    PEER_LABELS,
)
COST_FUNCTION_MEMORY_BYTE_SECONDS_TOTAL = Counter(
    "p2ptrain_cost_function_memory_byte_seconds_total",
    "Function memory x wall time of this peer's calls (divide by 2^30 for GB-seconds).",
    PEER_LABELS,
)
COST_FUNCTION_COLD_STARTS_TOTAL = Counter(
    "p2ptrain_cost_function_cold_starts_total", "Replies to this peer that came from a freshly started instance.",
    PEER_LABELS,
)
COST_POD_SECONDS_TOTAL = Counter(
    "p2ptrain_cost_pod_seconds_total", "Seconds the peer's pod and its Redis pod have been up, by component.",
    (*PEER_LABELS, "component"),
)
COST_PEER_BYTES_TOTAL = Counter(
    "p2ptrain_cost_peer_bytes_total", "Bytes moved between this peer and the others, by path.", (*PEER_LABELS, "path")
)
COST_REDIS_BYTES_TOTAL = Counter(
    "p2ptrain_cost_redis_bytes_total", "Bytes moved to and from Redis for this peer, by path.", (*PEER_LABELS, "path")
)


_CHILDREN: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}


def child(metric: MetricWrapperBase, **labels: str) -> Any:
    """``metric.labels(**labels)``, made once per label set: prometheus_client checks the names and
    takes a lock on every ``labels`` call, and a round's hot paths make dozens of them. The label sets
    are bounded (see above), so is this cache."""
    key = (id(metric), tuple(labels.items()))
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(**labels)
    return found


def peer_labels(job: str, namespace: str, peer: int) -> dict[str, str]:
    return {"job": job, "namespace": namespace, "peer": str(peer)}


def record_excluded_rounds(labels: dict[str, str], peers: int, included: Collection[int]) -> None:
    """After a round closes: count one more round for every peer left out, reset the others.

    Series exist for every peer of the job from the first round on (``peers`` squared per job at
    most), so an alert can tell "never excluded" from "not reporting".
    """
    for other in range(peers):
        series = PEER_EXCLUDED_ROUNDS.labels(**labels, excluded_peer=str(other))
        if other in included:
            series.set(0)
        else:
            series.inc()
