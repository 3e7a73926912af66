"""The operator's Prometheus metrics, declared only here so that peers and functions never export them.

Names follow the conventions of ``p2ptrain.metrics`` (base units, ``_total``, bounded labels).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_CREATED_TOTAL = Counter("p2ptrain_operator_jobs_created_total", "Jobs whose children were created.")
JOBS_SUCCEEDED_TOTAL = Counter("p2ptrain_operator_jobs_succeeded_total", "Jobs that succeeded.")
JOBS_FAILED_TOTAL = Counter("p2ptrain_operator_jobs_failed_total", "Jobs that failed.")
JOBS_RESTARTED_TOTAL = Counter("p2ptrain_operator_jobs_restarted_total", "Job restarts after peer failure.")
RECONCILE_SECONDS = Histogram("p2ptrain_operator_reconcile_seconds", "Time one reconcile handler takes.", ("handler",))
RECONCILE_ERRORS_TOTAL = Counter(
    "p2ptrain_operator_reconcile_errors_total",
    "Reconcile handler runs that ended in an error (kopf retries them), by handler.",
    ("handler",),
)
JOBS = Gauge("p2ptrain_operator_jobs", "Jobs known to the operator, by phase.", ("phase",))
