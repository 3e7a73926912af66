"""The gradient function's server: bounded, checked event decoding in front of func-python, and
``p2ptrain function`` (what a Knative pod runs). The function itself lives in ``gradient``.
"""

from __future__ import annotations

import asyncio
import logging
import os

from p2ptrain import asgi, wire
from p2ptrain.config import ConfigError
from p2ptrain.gradient import MAX_REQUEST_BYTES, REJECT_STATUS, GradientFunction, new

log = logging.getLogger("p2ptrain.gradient")


class FunctionFront:
    """The function's ASGI app: bounded, checked event decoding in front of func-python's middleware
    (which still answers lifespan and health), plus ``/metrics`` on the same port (Knative gives a
    container one port).

    func-python reads any body whole by repeated concatenation and answers every bad event with one
    generic 400; here a body over ``max_body_bytes`` is refused with 413 before it is read, and a
    malformed, unsigned or mistyped event gets the 4xx of its reason, counted like any other refusal.
    """

    def __init__(self, function: GradientFunction, max_body_bytes: int = MAX_REQUEST_BYTES) -> None:
        from func_python.cloudevent import ASGIApplication
        from prometheus_client import make_asgi_app

        self.function = function
        self.max_body_bytes = max_body_bytes
        self._func_app = ASGIApplication(function)
        self._metrics_app = make_asgi_app()

    async def on_start(self) -> None:
        await self._func_app.on_start()

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/health/liveness", "/health/readiness"):
            await self._func_app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self._metrics_app(scope, receive, send)
            return
        body: bytes | None = b""
        try:
            if scope["method"] != "POST":
                raise wire.WireError("method", f"events are POSTed; {scope['method']} is not accepted")
            body = await asgi.read_body(receive, self.max_body_bytes, scope)
            if body is None:
                raise wire.WireError("oversize", f"request body exceeds the limit of {self.max_body_bytes} bytes")
            incoming = wire.from_http(
                asgi.headers_of(scope), body, max_body_bytes=self.max_body_bytes, data_content_types=(wire.JSON,)
            )
        except wire.WireError as exc:
            self.function.count_rejected(exc)
            await asgi.respond(send, REJECT_STATUS.get(exc.reason, 400), f"{exc.reason}: {exc}".encode(),
                               reason=exc.reason, close=body is None)
            return
        from func_python.cloudevent import CloudEventSender

        scope["event"] = incoming
        await self.function.handle(scope, receive, CloudEventSender(send))


def serve() -> None:
    """Serve the gradient function on func-python's address (``LISTEN_ADDRESS``, default port 8080).

    Config, secrets, data and model are loaded before the port opens: a function that cannot start
    logs why and exits 1, so Kubernetes restarts it and the pod shows the reason, instead of serving
    liveness 200 and readiness 500 forever.
    """
    import signal

    from func_python.sock import bind

    function = new()
    try:
        function.start(dict(os.environ))
    except (ConfigError, OSError, ValueError) as exc:
        log.error("gradient function cannot start: %s", exc)
        raise SystemExit(1) from exc
    app = FunctionFront(function)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asgi.serve(app, bind(), stop, graceful_timeout=5)

    asgi.run(main())
