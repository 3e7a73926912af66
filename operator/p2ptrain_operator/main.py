"""Entry point of the operator (``p2ptrain operator``): settings, login, metrics, and kopf's loop.

kopf has no leader election, so the operator runs as one replica (standalone, no peering); its
liveness endpoint backs the Deployment's probes and Prometheus metrics are served on their own port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

import kopf
from prometheus_client import start_http_server

from p2ptrain_operator.cleanup import cleanup
from p2ptrain_operator.handlers import build_registry, new_memo
from p2ptrain_operator.kube import Connection, Kube
from p2ptrain_operator.settings import Settings

log = logging.getLogger(__name__)


async def operate(
    settings: Settings,
    connection: Connection | None = None,
    *,
    stop_flag: Any = None,
    ready_flag: Any = None,
    liveness: bool = True,
) -> None:
    await kopf.operator(
        registry=build_registry(settings),
        memo=new_memo(settings, connection),
        standalone=True,
        clusterwide=not settings.namespace,
        namespaces=[settings.namespace] if settings.namespace else (),
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if liveness else None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_in_thread(settings: Settings, connection: Connection) -> tuple[threading.Thread, threading.Event]:
    """Run the operator in its own thread and loop (fast shutdown; used by tests). Returns (thread, stop)."""
    stop = threading.Event()
    ready = threading.Event()

    def target() -> None:
        try:
            asyncio.run(operate(settings, connection, stop_flag=stop, ready_flag=ready, liveness=False))
        except TimeoutError:
            # kopf re-raises the TimeoutError of a handler it cancelled while stopping; after a
            # requested stop that is the expected end, anything else is a real failure.
            if not stop.is_set():
                raise
            log.debug("operator stopped with handlers cancelled mid-call")

    thread = threading.Thread(target=target, name="p2ptrain-operator", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    return thread, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2ptrain operator",
        description="Reconcile P2PTrainingJobs into peers, Redis servers and a Knative gradient function. "
        "Configured by P2PTRAIN_OPERATOR_* environment variables (IMAGE, NAMESPACE, METRICS_PORT, "
        "LIVENESS_PORT, CLUSTER_DOMAIN, POLL_SECONDS).",
    )
    parser.add_argument("--verbose", action="store_true")
    actions = parser.add_subparsers(dest="action", metavar="{cleanup}")
    clean = actions.add_parser(
        "cleanup",
        help="delete every job the operator watches and wait until they are gone (the chart's pre-delete hook)",
        description="Delete every P2PTrainingJob in P2PTRAIN_OPERATOR_NAMESPACE (empty: every namespace) and "
        "wait until the operator has released them; after --timeout, remove the operator's finalizer from "
        "jobs no operator released. Exits 1 if jobs are still left.",
    )
    clean.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the operator (default 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    if args.action == "cleanup":
        return run_cleanup(Connection.in_cluster(), settings.namespace, args.timeout)
    start_http_server(settings.metrics_port)
    log.info("operator starting: image=%s namespace=%s", settings.image, settings.namespace or "<all>")
    asyncio.run(operate(settings))
    return 0


def run_cleanup(connection: Connection, namespace: str, timeout: float, poll: float = 1.0) -> int:
    """The cleanup command: 0 when no job is left, 1 otherwise (Helm then reports the hook failed)."""
    kube = Kube(connection, user_agent="p2ptrain-cleanup")
    try:
        report = asyncio.run(cleanup(kube, namespace, timeout, poll))
    finally:
        kube.close()
    log.info("cleanup: deleted %d jobs, released %d without an operator", len(report.deleted), len(report.released))
    if report.left:
        log.error("cleanup: jobs still present (finalizers of other controllers?): %s", ", ".join(report.left))
        return 1
    return 0
