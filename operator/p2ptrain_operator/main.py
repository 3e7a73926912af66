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

from p2ptrain_operator.handlers import register
from p2ptrain_operator.kube import Connection, Kube
from p2ptrain_operator.settings import Settings

log = logging.getLogger(__name__)


def build_registry(settings: Settings, connection: Connection | None) -> tuple[kopf.OperatorRegistry, dict[str, Kube]]:
    """A registry with every handler; ``connection`` None means in-cluster credentials."""
    registry = kopf.OperatorRegistry()
    clients: dict[str, Kube] = {}

    def kube() -> Kube:
        if "kube" not in clients:
            clients["kube"] = Kube(connection or Connection.in_cluster())
        return clients["kube"]

    register(registry, settings, kube)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if connection is not None:
            return kopf.ConnectionInfo(server=connection.server, insecure=connection.insecure, token=connection.token)
        return kopf.login_with_service_account(**kwargs) or kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        if "kube" in clients:
            await clients.pop("kube").close()

    return registry, clients


async def operate(
    settings: Settings,
    connection: Connection | None = None,
    *,
    stop_flag: Any = None,
    ready_flag: Any = None,
    liveness: bool = True,
) -> None:
    registry, _ = build_registry(settings, connection)
    await kopf.operator(
        registry=registry,
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    start_http_server(settings.metrics_port)
    log.info("operator starting: image=%s namespace=%s", settings.image, settings.namespace or "<all>")
    asyncio.run(operate(settings))
    return 0
